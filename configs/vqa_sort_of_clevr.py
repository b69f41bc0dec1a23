"""VQA on the embedded Sort-of-CLEVR (Santoro et al. 2017) with English questions.

  python train.py --config configs/vqa_sort_of_clevr.py --workdir workdirs/vqa
  python train.py --config configs/vqa_sort_of_clevr.py:size=small,fusion=film --workdir /tmp/v
  python train.py --config configs/vqa_sort_of_clevr.py --config.optim.lr=3e-4 ...

Args (after the colon): size = tiny | small | default; fusion = any name in
`mmjax.fusion.FUSIONS.names()`; text = rnn | bert | minilm.
"""

import ml_collections

from mmjax.train.config import parse_arg, standard_optim_and_train

FUSION_KWARGS = {
    "relation": {"query": "text"},
    "film": {"condition": "text"},
    # The default: the question reads the image grid through one pre-LN cross-attention layer
    # (LXMERT's post-LN layer keeps this model at the answer prior; bench/sort_of_clevr_reference.py)
    # with 4x sharper initial attention logits (qk_scale), which gets it off the prior sooner, and
    # 8 heads: one head learns to find the object a question's colour names and the run leaves the
    # binding plateau when one does, so more heads get there sooner (4 heads: shape questions
    # rose at ~4,500 steps; 8: at ~2,500; bench/colour_binding.py --num_heads).
    # A second layer whose heads prefer grid cells near (or far from) where they looked in the
    # first (spatial="image": the distance bias of mmjax/fusion/cross_attention.py) took closest
    # and furthest off the majority-shape shortcut (0.69): relational 0.68-0.79 -> 0.93 in the
    # README's 30-minute run of an earlier default. (depth=1 needs spatial=None, revisit=False.)
    # distance_init / revisit: the second layer's heads start near (even heads) or far (odd) from
    # where the same head looked in the first, and away from the cells it looked at (revisit_init
    # < 0), instead of learning those scales from zero: with zero scales the second hop kept
    # looking at the named object and closest/furthest sat on the 0.69 line past step 3,600 on
    # seed 2; with them 0.82/0.90 at 2,400 and 0.90/0.95 at 3,000 (issue 5). 0 / False: off.
    "cross_attention": {"update": ("text",), "depth": 2, "num_heads": 8, "mlp_dim": 128, "norm": "pre",
                        "qk_scale": 4.0,
                        "spatial": ml_collections.FieldReference("image", field_type=str),
                        "revisit": True, "distance_init": 0.1, "revisit_init": -4.0},
}


def get_config(arg=None):
  arg = parse_arg(arg, size="default", fusion="cross_attention", text="rnn")
  c = ml_collections.ConfigDict()
  c.task = "vqa_sort_of_clevr"
  c.name = f"vqa-{arg.fusion}-{arg.size}"
  c.seed = 0
  # The default recipe: three stride-2 convs (a 10x10 grid) with coordinates and group norm, two
  # Transformer layers over the grid once per image (this is what relational questions need), a
  # narrow bidirectional LSTM attention-pooled into the question vector, and that vector reading
  # the grid through two pre-LN cross-attention layers (the second biased by distance, see
  # FUSION_KWARGS).
  # The image's keys and values are projected once per image, not per question (32 images carry
  # 640 questions per step).
  steps, bs, width = {"tiny": (20, 8, 32), "small": (600, 32, 64), "default": (6000, 32, 64)}[arg.size]

  c.data = ml_collections.ConfigDict()
  c.data.data_dir = ml_collections.FieldReference(None, field_type=str)
  c.data.batch_size = bs  # images per step; each carries 20 questions
  c.data.eval_batch_size = 50 if arg.size != "tiny" else 8
  # Train/test questions need up to 17 tokens with [CLS], [SEP]; paraphrases up to 32 (their
  # unseen words split into characters): with 20, six of the twelve paraphrase templates lost
  # the colour word. Padding does not change the model's math (masked LSTM and pooling).
  c.data.max_len = 32
  c.data.worker_count = 0
  c.data.eval_splits = ("test", "paraphrase")
  # Images per split (train, test, paraphrase); None = the full 9,800 / 200 / 200. Smaller
  # counts build a separate, smaller copy whose records equal the first ones of the full set.
  c.data.num_images = (64, 16, 16) if arg.size == "tiny" else None

  c.model = ml_collections.ConfigDict()
  # coord_freqs=4: sin/cos coordinate features, with which attention logits can depend on the
  # offset between cells; the shape questions were solved by step 1,800-2,400 instead of
  # 3,000-3,600 (four runs). rel_pos (a relative-position bias in the grid Transformer) is off:
  # it did not make distance questions learnable in 3,600 steps (issue 5 notes). pixel_freqs=2:
  # sin/cos of the pixel values, without which gray and orange (convex mixes of the other
  # colours against the white background) could not be singled out by attention and one seed
  # never bound gray (bench/colour_binding.py, issue 5).
  c.model.vision = {"name": "small_cnn", "features": width, "channels": (32, 32, 32),
                    "norm": "group", "norm_groups": 8, "coords": True, "coord_freqs": 4,
                    "depth": 2, "rel_pos": 0, "pixel_freqs": 2}
  # embed_skip: each word's embedding is added (linearly mapped) to the BiLSTM's output, so the
  # colour word contributes the same vector to the question in every template. Without it the
  # attention head that found the named object for position questions put only ~0.2 of its
  # weight on it for shape questions (contextual colour states differ per template), and two of
  # four seeds sat on the shape plateau past step 2,400 (issue 5).
  # pool="attention": a learned query attends over the tokens (4 heads) instead of the mean. With
  # the mean, the colour word's share of the question vector shrinks with the template's length
  # (1/8 in "What shape is the red object?", 1/15 in the closest / furthest templates) and the
  # template's other words add their own offset, so the head that bound the named object for
  # shape questions put only 0.1-0.55 of its weight on it for closest / furthest ones (seed 0,
  # step 4,200). With attention pooling one head put 0.99-1.00 on it for every kind by step 1,200
  # (seed 0; bench/attention_probe.py), and max pooling only 0.52-0.91.
  text = {
      "rnn": {"name": "rnn_text", "vocab_size": 0, "features": width, "hidden": width // 2,
              "pool": "attention", "pool_heads": 4, "embed_skip": True},
      "bert": {"name": "bert", "variant": "tiny", "vocab_size": 0, "max_len": 32},
      "minilm": {"name": "minilm"},
  }[arg.text]
  c.model.text = text
  c.model.fusion = arg.fusion
  c.model.fusion_kwargs = FUSION_KWARGS.get(arg.fusion, {})
  c.model.features = width
  c.model.head_hidden = 2 * width
  c.model.modality_dropout = 0.0
  c.model.question_tokens = "pooled"  # the question reaches the fusion as one vector ("all": tokens)
  # Encode each distinct question of a step once (Sort-of-CLEVR has 108 distinct training
  # questions; a step carries 640): 0.84x the step time, same math (bench/step_time.py). Steps
  # with more distinct questions encode them all; 0 turns it off (e.g. on many devices).
  c.model.unique_questions = 128
  c.model.dtype = "float32"  # compute dtype: "bfloat16" computes in bf16 on f32 master weights

  # tiny=False for every size: the tiny VQA config keeps lr 1e-3 and evaluates every tenth.
  standard_optim_and_train(c, steps, tiny=False)
  # The default's 6,000 steps take ~40 minutes on 2 CPU cores (4,620 in 30 on 2026-11-29);
  # stop (evaluate, save) at 30. 0 (or None) = no cap; on the command line
  # --config.train.max_minutes=0 (absl cannot parse None for a float field).
  c.train.max_minutes = 30.0 if arg.size == "default" else None
  return c
