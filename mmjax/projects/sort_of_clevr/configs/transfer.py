"""Cross-modal transfer on Sort-of-CLEVR VQA: a pretrained question encoder (MiniLM) or none.

  C=mmjax/projects/sort_of_clevr/configs/transfer.py
  python train.py --config $C:transfer=finetune --workdir workdirs/vqa-ft
  python train.py --config $C:transfer=lora,size=small --workdir /tmp/l
  python -m mmjax.projects.sort_of_clevr.bench.transfer --steps 2000  # every variant, one table

Args (after the colon):
  transfer = finetune (MiniLM trained at `text_lr`, the rest at optim.lr: the seed article's
             recipe of pretrained encoders fine-tuned with a small learning rate)
           | frozen   (MiniLM fixed)
           | lora     (MiniLM fixed, LoRA adapters of rank `lora_rank` on its attention and MLP
                       Dense layers trained at optim.lr)
           | scratch  (the `scratch` encoder, randomly initialised, on the data set's own
                       tokenizer, whose vocabulary has never seen the paraphrase split's words)
  scratch = rnn | bert (bert-tiny); size, fusion as in configs/vqa.py (fusion empty = its
  default); text_lr; lora_rank.

Everything else is configs/vqa.py's, except the question length: the shortest that truncates no
question of any split with the variant's tokenizer: 20 for MiniLM's (it needs 18), 32 for the
data set's own WordPiece (the paraphrase split's unseen words split into pieces). The pipeline
warns if a question is cut. Padding costs time, not accuracy.
"""

from mmjax.projects.sort_of_clevr.configs import vqa
from mmjax.train.config import parse_arg

TRANSFERS = ("finetune", "frozen", "lora", "scratch")
MAX_LEN = {"minilm": 20, "scratch": 32}  # tokenizer -> question length (see above)
# Parameter paths ('encoders/text/encoder/layers/0/attn/query/kernel') of the question encoder.
TEXT = r"encoders/text/.*"
LORA_TARGETS = r"^encoders/text/encoder/layers/\d+/(attn/(query|key|value|out)|mlp/fc[12])$"
LORA_PARAMS = r"encoders/text/.*/lora_[ab]"


def get_config(arg=None):
  arg = parse_arg(arg, transfer="finetune", scratch="rnn", size="default", fusion="",
                  text_lr=5e-5, lora_rank=8)
  if arg.transfer not in TRANSFERS:
    raise ValueError(f"transfer: expected one of {TRANSFERS}, got {arg.transfer!r}")
  if arg.scratch not in ("rnn", "bert"):
    raise ValueError(f"scratch: expected 'rnn' or 'bert', got {arg.scratch!r}")
  text = arg.scratch if arg.transfer == "scratch" else "minilm"
  base = f"size={arg.size},text={text}" + (f",fusion={arg.fusion}" if arg.fusion else "")
  c = vqa.get_config(base)
  variant = f"scratch_{arg.scratch}" if arg.transfer == "scratch" else arg.transfer
  c.name = f"vqa-transfer-{variant}-{arg.size}"

  c.data.max_len = MAX_LEN["minilm" if text == "minilm" else "scratch"]
  c.data.tokenizer = "minilm" if text == "minilm" else ""  # "" = the data set's own
  if "max_len" in c.model.encoders.text:  # a learned position table must cover the questions
    c.model.encoders.text.max_len = c.data.max_len

  if arg.transfer == "finetune":
    c.optim.groups = [{"name": "text", "pattern": TEXT, "lr": arg.text_lr}]
  elif arg.transfer == "frozen":
    c.optim.groups = [{"name": "text", "pattern": TEXT, "freeze": True}]
  elif arg.transfer == "lora":
    c.lora = {"pattern": LORA_TARGETS, "rank": arg.lora_rank, "alpha": float(arg.lora_rank)}
    c.optim.groups = [{"name": "text_lora", "pattern": LORA_PARAMS},
                      {"name": "text", "pattern": TEXT, "freeze": True}]
  return c
