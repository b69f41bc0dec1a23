"""VQA on the embedded Sort-of-CLEVR (Santoro et al. 2017) with English questions: the project's
tuned recipe (see the project's README.md for what each choice bought).

  python train.py --config mmjax/projects/sort_of_clevr/configs/vqa.py --workdir workdirs/vqa
  C=mmjax/projects/sort_of_clevr/configs/vqa.py
  python train.py --config $C:size=small,fusion=film --workdir /tmp/v
  python train.py --config $C --config.optim.lr=3e-4 ...

Args (after the colon): size = tiny | small | default; fusion = cross_attention (the project's
distance-biased cross-attention), flat_concat (the project's flattened-grid concat) or any name
in `mmjax.fusion.FUSIONS.names()`; text = rnn | bert | minilm.
"""

import ml_collections

from mmjax.train.config import parse_arg, standard_optim_and_train

# The project's blocks, by the short names the `fusion` argument takes.
FUSION_NAMES = {"cross_attention": "mmjax.projects.sort_of_clevr.fusion:distance_cross_attention",
                "flat_concat": "mmjax.projects.sort_of_clevr.model:flat_concat"}
FUSION_KWARGS = {
    "relation": {"query": "text"},
    "film": {"condition": "text"},
    # The question reads the image grid through two pre-LN layers with sharper initial logits;
    # the second hop's heads start near (even) or far (odd) from where they looked in the first.
    "cross_attention": {"update": ("text",), "depth": 2, "num_heads": 8, "mlp_dim": 128, "norm": "pre",
                        "qk_scale": 4.0,
                        "spatial": ml_collections.FieldReference("image", field_type=str),
                        "revisit": True, "distance_init": 0.1, "revisit_init": -4.0},
    "flat_concat": {"flatten": {"image": 100}},  # the default vision's 10x10 grid
}


def add_data(c: ml_collections.ConfigDict, size: str, bs: int) -> None:
  """The data set's `data` and `input` sections (every config training on Sort-of-CLEVR VQA)."""
  c.data = ml_collections.ConfigDict()
  c.data.data_dir = ml_collections.FieldReference(None, field_type=str)
  c.data.batch_size = bs  # images per step; each carries 20 questions
  c.data.eval_batch_size = 50 if size != "tiny" else 8
  # Paraphrases need up to 32 tokens with [CLS], [SEP]; padding does not change the model's math.
  c.data.max_len = 32
  c.data.worker_count = 0
  c.data.eval_splits = ("test", "paraphrase")
  # Images per split (train, test, paraphrase); None = the full 9,800 / 200 / 200. Smaller
  # counts build a separate, smaller copy whose records equal the first ones of the full set.
  c.data.num_images = (64, 16, 16) if size == "tiny" else None
  # The question tokenizer: "minilm" or a tokenizer folder; "" = MiniLM's for the "minilm" text
  # encoder, else the data set's own WordPiece.
  c.data.tokenizer = ""

  # Record -> model inputs and labels, the same in training and evaluation; `mmjax.predict` runs
  # pp_eval on a request. Questions are cut to data.max_len tokens.
  image = "image.decode|image.value_range(0, 1)|"
  questions = ("text.tokenize(" + c.data.get_ref("max_len").to_str() +
               ", key='questions', outkey='question_ids', mask_key='question_mask')")
  labels = ("|rename(answers='answer', kinds='kind', subtypes='subtype', question_colors='color')|"
            "keep('image', 'question_ids', 'question_mask', 'answer', 'kind', 'subtype', 'color')")
  c.input = ml_collections.ConfigDict()
  c.input.pp_train = image + questions + labels
  c.input.pp_eval = image + questions + labels


def get_config(arg=None):
  arg = parse_arg(arg, size="default", fusion="cross_attention", text="rnn")
  c = ml_collections.ConfigDict()
  c.task = "mmjax.projects.sort_of_clevr.task:vqa_sort_of_clevr"
  c.name = f"vqa-{arg.fusion}-{arg.size}"
  c.seed = 0
  steps, bs, width = {"tiny": (20, 8, 32), "small": (600, 32, 64), "default": (6000, 32, 64)}[arg.size]

  add_data(c, arg.size, bs)

  c.model = ml_collections.ConfigDict()
  # VQAModel that encodes each distinct question of a step once (few distinct questions, many
  # copies): `unique_questions` of them at most (0: off).
  c.model.name = "mmjax.projects.sort_of_clevr.model:unique_questions_vqa"
  c.model.unique_questions = 128
  c.model.encoders = {
      # Three stride-2 convs (a 10x10 grid) with sin/cos coordinates (attention can depend on
      # offsets) and sin/cos pixel values (so every colour, orange and gray included, can be
      # singled out), then two Transformer layers over the grid once per image (what relational
      # questions need).
      "image": {"name": "mmjax.projects.sort_of_clevr.model:pixel_freq_cnn", "features": width,
                "channels": (32, 32, 32), "norm": "group", "norm_groups": 8, "coords": True,
                "coord_freqs": 4, "depth": 2, "pixel_freqs": 2},
      # A narrow BiLSTM, attention-pooled into the question vector; embed_skip adds each word's
      # own embedding, so the colour word means the same in every template.
      "text": {
          "rnn": {"name": "rnn_text", "vocab_size": 0, "features": width, "hidden": width // 2,
                  "pool": "attention", "pool_heads": 4, "embed_skip": True},
          "bert": {"name": "bert", "variant": "tiny", "vocab_size": 0, "max_len": 32},
          "minilm": {"name": "minilm"},
      }[arg.text],
  }
  c.model.fusion = FUSION_NAMES.get(arg.fusion, arg.fusion)
  c.model.fusion_kwargs = FUSION_KWARGS.get(arg.fusion, {})
  c.model.features = width
  c.model.head_hidden = 2 * width
  c.model.modality_dropout = 0.0
  c.model.question_tokens = "pooled"  # the question reaches the fusion as one vector ("all": tokens)
  c.model.dtype = "float32"  # compute dtype: "bfloat16" computes in bf16 on f32 master weights

  # tiny=False for every size: the tiny VQA config keeps lr 1e-3 and evaluates every tenth.
  standard_optim_and_train(c, steps, tiny=False)
  # Stop (evaluate, save) the default size at 30 minutes; on the command line
  # --config.train.max_minutes=0 turns the cap off (absl cannot parse None for a float field).
  c.train.max_minutes = 30.0 if arg.size == "default" else None
  return c
