"""Our Linen models as Flax NNX modules, through `flax.nnx.bridge.ToNNX` (flax 0.12).

    from vleraser_jax.models.nnx_bridge import to_nnx
    module = to_nnx(model, params)          # an nnx.Module holding the parameters as nnx.Param
    logits = module(**inputs).logits        # == model.apply({"params": params}, **inputs).logits
"""

from __future__ import annotations

from flax import nnx, traverse_util


def to_nnx(model, params, seed: int = 0) -> nnx.Module:
    """`model` (any of our Linen models) wrapped by `nnx.bridge.ToNNX`, holding `params`.

    The wrapper is built from abstract shapes (`nnx.eval_shape` of `lazy_init` on the model's dummy inputs), so no
    random weights are allocated, then given `params`. eval_shape leaves the wrapper's rng streams abstract too;
    they are replaced by concrete ones from `seed` (our models draw no randomness when applied).
    """
    def wrapper():
        return nnx.bridge.ToNNX(model, rngs=nnx.Rngs(seed))

    abstract = nnx.eval_shape(lambda: wrapper().lazy_init(**model.dummy_inputs()))
    graphdef, state, _ = nnx.split(abstract, nnx.Param, ...)
    expected = {k: v.shape for k, v in traverse_util.flatten_dict(nnx.to_pure_dict(state)).items()}
    given = {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(params).items()}
    if expected != given:
        missing, extra = sorted(set(expected) - set(given)), sorted(set(given) - set(expected))
        shapes = sorted(k for k in set(expected) & set(given) if tuple(expected[k]) != given[k])
        raise ValueError(f"params do not fit {type(model).__name__}: missing {missing[:3]}, unexpected {extra[:3]}, "
                         f"wrong shapes {shapes[:3]}")
    nnx.replace_by_pure_dict(state, params)
    _, _, rngs = nnx.split(wrapper(), nnx.Param, ...)
    return nnx.merge(graphdef, state, rngs)
