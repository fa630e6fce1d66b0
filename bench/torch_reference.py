"""PyTorch reference of VL-Eraser stage 1 and of an NPO step, written independently of the JAX code.

Same math as vleraser_jax (DESIGN §4), on transformers' `LlavaForConditionalGeneration`:
- LoRA as forward hooks on the LM's linears: y ← y + scale · ((P x) a) b  (a [F_in, R], b [R, D_out], the
  JAX tree's layout, values copied from it), P x = x − (x U) Uᵀ when a vacuum basis U is given;
- VL-Eraser: the down_proj inputs h are captured by the same hooks in a LoRA-free pass (the frozen teacher); per
  block mean_s∈mask [1 − cos(W_down h_s, scale · B A P h_s)]; L = λ · mean over blocks + (1 − λ) CE, CE with the
  LoRA "added" to the FFN output;
- NPO ("batch_mean"): d = NLL̄_θ − NLL̄_ref (ref = the model without LoRA, no grad), L = −(2/β) log σ(β d);
- torch.optim.AdamW + clip_grad_norm_, the trainer's optimizer (constant lr, decay on matrices only).
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def _module(model, path: str):
    """JAX module path "llm/layers_3/mlp/down_proj" -> the torch Linear."""
    parts = path.split("/")
    if parts[0] != "llm" or not parts[1].startswith("layers_"):
        raise ValueError(f"not an LM block path: {path}")
    layer = model.model.language_model.layers[int(parts[1][len("layers_"):])]
    for name in parts[2:]:
        layer = getattr(layer, name)
    return layer


def _flat(tree, prefix=()):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _flat(v, prefix + (k,))
        else:
            yield prefix + (k,), v


def lora_entries(tree) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for path, value in _flat(tree):
        out.setdefault("/".join(path[:-1]), {})[path[-1]] = value
    return out


class TorchLoRA:
    """LoRA hooks on a frozen torch model. params: {module path: {"a", "b"}} as trainable tensors."""

    def __init__(self, model, lora_tree: dict, projectors: dict | None = None, capture: str | None = "down_proj"):
        self.model = model
        for p in model.parameters():
            p.requires_grad_(False)
        self.enabled = True
        self.keys: dict[str, torch.Tensor] = {}
        self.entries = {}
        self.params = []
        proj = lora_entries(projectors) if projectors is not None else {}
        self.handles = []
        for path, e in sorted(lora_entries(lora_tree).items()):
            a = torch.tensor(np.asarray(e["a"]), requires_grad=True)
            b = torch.tensor(np.asarray(e["b"]), requires_grad=True)
            scale = float(np.asarray(e["scale"]))
            basis = torch.tensor(np.asarray(proj[path]["basis"])) if path in proj else None
            entry = {"a": a, "b": b, "scale": scale, "basis": basis}
            self.entries[path] = entry
            self.params += [a, b]
            self.handles.append(_module(model, path).register_forward_hook(self._hook(path, entry, capture)))

    def _hook(self, path, entry, capture):
        def hook(module, inputs, output):
            x = inputs[0]
            if capture and path.endswith(capture):
                self.keys[path] = x
            if not self.enabled:
                return output
            return output + self.delta(x, entry)

        return hook

    @staticmethod
    def delta(x, entry):
        if entry["basis"] is not None:
            u = entry["basis"]
            x = x - (x @ u) @ u.T
        return (x @ entry["a"]) @ entry["b"] * entry["scale"]

    @contextlib.contextmanager
    def disabled(self):
        self.enabled = False
        try:
            yield
        finally:
            self.enabled = True

    def remove(self):
        for h in self.handles:
            h.remove()


def causal_lm_nll(logits, labels):
    """(summed NLL, token count) of next-token prediction; labels align with inputs."""
    logits = logits[:, :-1].float()
    targets = labels[:, 1:]
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX,
                          reduction="sum")
    return nll, (targets != IGNORE_INDEX).sum().float()


def positions(attention_mask):
    """The JAX models' positions (cumsum(mask) − 1, clamped at 0), passed explicitly."""
    return torch.clamp(attention_mask.long().cumsum(-1) - 1, min=0)


def _forward(model, batch):
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 pixel_values=batch["pixel_values"], position_ids=positions(batch["attention_mask"]),
                 use_cache=False).logits


def to_torch(batch: dict) -> dict:
    return {k: torch.as_tensor(np.asarray(v)).long() if np.asarray(v).dtype.kind in "iu"
            else torch.as_tensor(np.asarray(v)) for k, v in batch.items()}


def vl_eraser_loss(lora: TorchLoRA, batch, lambda_: float):
    """(total, distill, ce) for one batch: the teacher's keys from a LoRA-free pass without gradient, the CE with
    the LoRA "added"; every real token distilled (distill_tokens="all")."""
    with torch.no_grad(), lora.disabled():
        lora.keys.clear()
        _forward(lora.model, batch)
        keys = {path: h.detach().float() for path, h in lora.keys.items()}
    logits = _forward(lora.model, batch)
    nll, count = causal_lm_nll(logits, batch["labels"])
    ce = nll / count.clamp(min=1.0)
    mask = batch["attention_mask"].float()
    per_block = []
    for path, entry in lora.entries.items():
        if not path.endswith("down_proj"):
            continue
        h = keys[path]
        teacher = h @ _module(lora.model, path).weight.T
        student = TorchLoRA.delta(h, entry)
        cos = (teacher * student).sum(-1) / (teacher.norm(dim=-1) * student.norm(dim=-1) + 1e-8)
        per_block.append(((1.0 - cos) * mask).sum() / mask.sum().clamp(min=1.0))
    distill = torch.stack(per_block).mean()
    return lambda_ * distill + (1.0 - lambda_) * ce, distill, ce


def npo_loss(lora: TorchLoRA, batch, beta: float):
    """−(2/β) log σ(β (NLL̄_θ − NLL̄_ref)), NLL̄ the batch's token-mean answer NLL ("batch_mean")."""
    nll, count = causal_lm_nll(_forward(lora.model, batch), batch["labels"])
    with torch.no_grad(), lora.disabled():
        ref_nll, ref_count = causal_lm_nll(_forward(lora.model, batch), batch["labels"])
    d = nll / count.clamp(min=1.0) - ref_nll / ref_count.clamp(min=1.0)
    return -(2.0 / beta) * F.logsigmoid(beta * d)


class Step:
    """One optimizer step of `loss(lora, batch)` (AdamW, global-norm clipping), like `trainer.make_train_step`."""

    def __init__(self, lora: TorchLoRA, loss, lr: float, weight_decay: float, b1=0.9, b2=0.999, eps=1e-8,
                 max_grad_norm: float | None = 1.0):
        self.lora, self.loss, self.max_grad_norm = lora, loss, max_grad_norm
        self.opt = torch.optim.AdamW(lora.params, lr=lr, betas=(b1, b2), eps=eps, weight_decay=weight_decay)

    def __call__(self, batch):
        self.opt.zero_grad(set_to_none=True)
        out = self.loss(self.lora, batch)
        total = out[0] if isinstance(out, tuple) else out
        total.backward()
        if self.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.lora.params, self.max_grad_norm)
        self.opt.step()
        return total.detach()

    def trainable(self) -> dict[str, dict[str, np.ndarray]]:
        return {p: {"a": e["a"].detach().numpy().copy(), "b": e["b"].detach().numpy().copy()}
                for p, e in self.lora.entries.items()}
