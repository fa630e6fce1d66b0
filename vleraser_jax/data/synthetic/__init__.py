"""Synthetic MLLMU-Bench: fictitious people with procedurally drawn portraits, written in the real schema.

Modules: `people` (names, facts, wordings), `portraits` (looks, drawing, poses), `tasks` (task items),
`writer` (`synthesize`, Base_Set, reading back), `tokenizer` (BPE tokenizers trained on the corpus).

`synthesize(out_dir)` writes the MLLMU-Bench layout (`<config>/train-00000-of-00001.parquet`, the
columns and nested types of `mllmu.config_features`), so `mllmu.load_benchmark` reads it like the
real benchmark. Everything is drawn from `seed` through named `random.Random` streams, and PNG and
parquet encoding are deterministic, so two runs with the same arguments give byte-identical files.

People. Each fictitious person has a unique made-up name, seven biography facts (Born, Birth_Year,
Employment, Education, Hobby, Residence, Pet) and a portrait whose visible features identify them:
face shape, skin, hair colour and style, eye colour, accessory and shirt (any two people differ in at
least three visible features), drawn in front of their own background colour and pattern. Test_Set
shows the same people in `num_test_images` new images: shifted, scaled, rotated, relit, on another
background. The celebrities of Retain_Set are a disjoint group built the same way. Facts come from
small pools by default (`fact_values="shared"`: a town, pet or hobby is several people's); with
`fact_values="unique"` no two people share a value of any fact, to measure how unlearning depends on
how person-specific the knowledge is.

Task items per person (as MLLMU-Bench asks them):
- `metadata` (ft_Data): the name question with the image, and one question per fact both about "the
  person in the image" and naming the person (15 pairs).
- Classification_Task: 8 Image_Textual (name + facts) and 7 Pure_Text multiple-choice questions;
  distractors are other values of the same attribute (other names for the name question) and the
  correct letter is dealt from shuffled decks of A-D, so letters are balanced.
- Generation_Task: 4 Image_Textual + 4 Pure_Text questions with one-sentence ground truths.
- Mask_Task: 4 + 4 cloze sentences with `__` and the bare fact as ground truth.
Questions come in three wordings: training (`metadata`), evaluation (Full_Set, forget/retain,
Retain_Set) and a paraphrase for Test_Set, whose distractors and letters are drawn afresh. IDs:
people "001", ..., celebrities "C001", ..., Base_Set's random portraits "P0001", ....

Splits follow the reference `data_split.py`: one ID list is shuffled again for each ratio (5, 10,
15), forget_N takes the first int(N/100 * people) and retain_(100-N) the rest; the forget sets are
therefore not nested (the published forget_5 / forget_10 ID lists are not either).

Text-only training rows: `metadata` entries carry our extra key `"Type"` ("Image_Textual" /
"Pure_Text"); the loader gives Pure_Text entries `image=None`. Real MLLMU-Bench entries have no Type
and keep the image, as its finetune.py does.

Base_Set (ours, not MLLMU-Bench's): what the base model learns before the fictitious fine-tune.
Columns `image` (Image, null for text-only rows), `ID`, `kind`, `question`, `answer`; a row trains
`question -> answer`, with the image when there is one, `question` already holding eval.py's
options and instruction lines. Kinds: "qa" (celebrity facts in all three wordings, like a pretrained
model knows paraphrases, with the image in several poses or with the name), "classification"
(celebrity facts as multiple choice, training wording, fresh distractors), "generation" / "cloze"
(celebrity facts in those eval task formats, all three wordings: the celebrities stand for world
knowledge the base model has in every phrasing, so the Retain_Set scores measure retention), "caption"
and "attribute" (descriptions of, and questions about, the drawn features of
random portraits that are none of the people). `load_base_set` reads it.
"""

from .people import (ANSWERS, CLOZES, EVAL, FACT_KEYS, FACT_POOLS, FACT_VALUE_MODES, N_OPEN_ITEMS, QUESTIONS, TEST,
                     TRAIN, VISUAL_SUBJECT, Person, answer_sentence, cloze_sentence, person_from_profile, question)
from .portraits import Look, Pose, describe_look, render_portrait
from .tasks import TASK_KINDS, task_rows
from .tokenizer import (FAMILIES, corpus_texts, train_qwen2_vl_tokenizer, train_synthetic_tokenizer,
                        train_tokenizer)
from .writer import (BASE_KINDS, BASE_SET, GENERATOR_VERSION, INFO_FILE, SPLIT_RATIOS, base_set_features,
                     fact_pools, fact_values_of, load_base_set, read_info, synthesize)

__all__ = [
    "ANSWERS", "BASE_KINDS", "BASE_SET", "CLOZES", "EVAL", "FACT_KEYS", "FACT_POOLS", "FACT_VALUE_MODES", "FAMILIES",
    "GENERATOR_VERSION", "INFO_FILE", "N_OPEN_ITEMS", "QUESTIONS", "SPLIT_RATIOS", "TASK_KINDS", "TEST", "TRAIN",
    "VISUAL_SUBJECT", "Look", "Person", "Pose", "answer_sentence", "base_set_features", "cloze_sentence",
    "corpus_texts", "describe_look", "fact_pools", "fact_values_of", "load_base_set", "person_from_profile",
    "question", "read_info", "render_portrait", "synthesize", "task_rows", "train_qwen2_vl_tokenizer",
    "train_synthetic_tokenizer", "train_tokenizer",
]
