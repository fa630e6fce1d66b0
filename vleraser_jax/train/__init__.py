"""Training stages: the base and vanilla models that unlearning is judged on.

Modules: `workspace` (data root, tokenizer, stage cache keys and directories), `tiny_models` (configs
and init of the models trained from scratch), `recipes` (what each stage trains on), `stages`
(`run_stage`).

- base: a tiny model trained from random init on the synthetic Base_Set (celebrity facts in every task
  format, captions of random portraits), so it learns the prompt formats and vision↔language alignment
  and knows the "real" celebrities — but none of the fictitious people.
- vanilla: the base model fine-tuned on ft_Data (every fictitious person, image-grounded and name-in-text
  questions), as MLLMU-Bench builds its vanilla model, with a replay share of the base data so the small
  model keeps its celebrities (a 7B model keeps them without help).

Both are saved with `save_pretrained` (loadable in transformers) under `<work_dir>/models/<stage>-<hash>`,
the hash covering every config field the stage depends on, so reruns reuse them. `c.family` picks the
architecture ("llava" or "qwen2_vl": configs/tiny_llava.py, configs/tiny_qwen2vl.py); prompts, tokenizer and
image inputs follow the family's processor. With `model.checkpoint` set (a real model) the base stage is that
checkpoint and the vanilla stage is MLLMU-Bench's LoRA fine-tune (see `run_stage`).

Training-side additions for the tiny models (none changes the evaluation protocol):
- `<stage>.mc_variants`: extra multiple-choice rows for the celebrities, each copy with freshly drawn
  distractors and a freshly dealt correct letter (`synthetic.task_rows`), so a model trained from scratch
  learns the *skill* (find the option that matches the fact) instead of memorising a few hundred letters.
- `vanilla.task_variants` / `vanilla.task_kinds`: **a deviation from MLLMU-Bench**, whose ft_Data holds
  only QA pairs. When > 0, the vanilla fine-tune also sees each fictitious person's facts in the task
  formats (multiple choice with fresh distractors and letters, cloze), in the *training* wording, never
  the evaluation items themselves (the evaluation uses another wording and its own fixed options). A
  7B LLaVA brings the multiple-choice skill from pre-training and applies it to facts it learnt as QA;
  a model trained from scratch in minutes does not transfer it well enough (see configs/tiny_llava.py
  for the measured numbers), so the tiny configs opt in. Set it to 0 for ft_Data alone.
- `<stage>.loss`: "token" (mean over answer tokens, transformers' default) or "example" (each row's mean
  answer-token loss, averaged over rows), so one-letter answers weigh as much as sentences.
- `<stage>.length_buckets`: batches are cut to a few fixed lengths per kind of row (image / text),
  chosen to minimise padding; each length compiles once.
"""
