"""Open-ended VQA on your own images, questions and answers (ten per question, as VQA v2).

  python train.py --config configs/vqa_open.py --config.input.train=data/train.jsonl \
      --config.input.eval=data/val.jsonl --workdir workdirs/my_vqa

Args (after the colon): size = tiny | small | default; fusion = any name in
`mmjax.fusion.FUSIONS.names()`. A manifest line is {"image": "img/1.png", "question": "what
color is the cube?", "answers": ["red", "red", "dark red", ...]} (one answer or a list). The
answer vocabulary is the data.num_answers most frequent normalised training answers (kept in the
workdir's answers.json); evaluation reports the official VQA accuracy (eval/vqa_accuracy).
"""

import ml_collections

from mmjax.train.config import parse_arg, standard_optim_and_train


def get_config(arg=None):
  arg = parse_arg(arg, size="default", fusion="cross_attention")
  c = ml_collections.ConfigDict()
  c.task = "vqa_open"  # mmjax.tasks.user_data.UserVQA
  c.name = f"vqa-open-{arg.fusion}-{arg.size}"
  c.seed = 0
  steps, bs, image, patch, width, depth, answers = {
      "tiny": (30, 16, 32, 8, 32, 1, 100), "small": (2000, 64, 64, 8, 128, 2, 1000),
      "default": (20000, 128, 224, 16, 256, 4, 3129)}[arg.size]

  c.input = ml_collections.ConfigDict()
  c.input.train = ""  # a JSONL/CSV manifest or tfds:NAME/SPLIT (required)
  c.input.eval = ""  # the same for evaluation; "" = none
  c.input.fields = {"image": "image", "question": "question", "answers": "answers"}

  c.data = ml_collections.ConfigDict()
  c.data.data_dir = ml_collections.FieldReference(None, field_type=str)  # TFDS data only
  c.data.batch_size = bs  # questions per step
  c.data.eval_batch_size = 16 if arg.size == "tiny" else 64
  c.data.image_size = image
  c.data.max_len = 16 if arg.size == "tiny" else 24  # question tokens, [CLS]/[SEP] included
  c.data.num_answers = answers  # the answer vocabulary: most frequent training answers
  c.data.max_answers = 10  # reference answers per question at most
  c.data.tokenizer = ""  # "": trained on input.train's questions; or "minilm", a tokenizer folder
  c.data.vocab_size = 0  # a trained tokenizer's size at most; 0: 8192
  c.data.verify_files = True  # read every file's header before training
  c.data.worker_count = 0

  # Record -> batch. The task adds answer_ids / answer_scores to each record: the vocabulary
  # entries its reference answers make right and their official scores (the training targets,
  # and the accuracy of a prediction).
  pp = ("image.decode|image.resize(" + c.data.get_ref("image_size").to_str() +
        ")|image.value_range(0, 1)|text.tokenize(" + c.data.get_ref("max_len").to_str() +
        ", key='question', outkey='question_ids', mask_key='question_mask')|"
        "keep('image', 'question_ids', 'question_mask', 'answer_ids', 'answer_scores')")
  c.input.pp_train = pp
  c.input.pp_eval = pp

  c.model = ml_collections.ConfigDict()
  c.model.name = "vqa"  # mmjax.models.vqa.VQAModel
  c.model.encoders = {
      "image": {"name": "vit", "variant": None, "width": width, "depth": depth, "heads": 4,
                "mlp_dim": 4 * width, "patch": patch, "image_size": 0},
      # vocab_size 0 takes the tokenizer's; no pooler: the fusion reads every token.
      "text": {"name": "bert", "variant": "tiny", "vocab_size": 0, "hidden": width, "depth": depth,
               "heads": 4, "mlp_dim": 4 * width, "max_len": c.data.get_ref("max_len"),
               "dropout": 0.0, "attn_dropout": 0.0, "pooler": False},
  }
  c.model.fusion = arg.fusion
  c.model.fusion_kwargs = ({"depth": depth, "num_heads": 4, "mlp_dim": 2 * width, "pool": "mean"}
                           if arg.fusion == "cross_attention" else {})
  c.model.features = width
  c.model.head_hidden = 2 * width
  c.model.question_tokens = "all"

  standard_optim_and_train(c, steps, tiny=arg.size == "tiny")
  return c
