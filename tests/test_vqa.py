"""The VQA model: every fusion block by one config value trains (loss goes down); contracts."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from mmjax.fusion import FUSIONS
from mmjax.train.config import load_config
from mmjax.train.tasks import TASKS

CONFIG = "mmjax/projects/sort_of_clevr/configs/vqa.py"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("vqa_data"))


def _task(data_dir, fusion, *overrides):
  cfg = load_config(f"{CONFIG}:size=tiny,fusion={fusion}",
                    [f"data.data_dir={data_dir}", *overrides])
  return TASKS.get(cfg.task)(cfg)


@pytest.fixture(scope="module")
def batches(data_dir):
  """The first two training batches of 4 images."""
  task = _task(data_dir, "concat")
  it = iter(task.dataset("train", train=True, batch_size=4, shard_index=0, shard_count=1))
  return [{k: jnp.asarray(v) for k, v in next(it).items()} for _ in range(2)]


@pytest.fixture(scope="module")
def batch(batches):
  return batches[0]


# The default config passes the question as one pooled vector; "all" passes every token.
@pytest.mark.parametrize("fusion,question_tokens",
                         [(f, "pooled") for f in FUSIONS.names()] + [("cross_attention", "all")])
def test_every_fusion_trains(data_dir, batches, fusion, question_tokens):
  """12 Adam steps on one batch lower the loss, and the trained model's answers depend on the image."""
  batch, other = batches
  task = _task(data_dir, fusion, f"model.question_tokens={question_tokens}")
  model = task.build_model(nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tx = optax.adam(3e-3)
  opt = tx.init(params)

  @jax.jit
  def step(params, opt):
    def loss_fn(p):
      return task.loss_fn(nnx.merge(graphdef, p, rest), batch, False)[0]
    loss, g = jax.value_and_grad(loss_fn)(params)
    u, opt = tx.update(g, opt, params)
    return optax.apply_updates(params, u), opt, loss

  losses = []
  for _ in range(12):
    params, opt, loss = step(params, opt)
    losses.append(float(loss))
  assert np.isfinite(losses).all()
  assert losses[-1] < 0.8 * losses[0], losses  # the question's answer prior alone gets here

  # The same questions about another batch's images: a wiring that drops the image (zeroed tokens,
  # image marked absent) gives bit-identical logits. 12 steps do not bind objects, so the answers
  # mostly stay the answer prior's; measured: every question's logits move by >= 4e-4.
  @jax.jit
  def logits(params, images):
    return nnx.merge(graphdef, params, rest)(images, batch["question_ids"], batch["question_mask"])[0]

  moved = np.abs(logits(params, batch["image"]) - logits(params, other["image"])).max(-1)  # (B, Q)
  assert (moved > 1e-5).all(), f"{(moved <= 1e-5).sum()} of {moved.size} questions ignore the image"


def test_absent_image_does_not_change_answers(data_dir, batch):
  task = _task(data_dir, "cross_attention")
  model = task.build_model(nnx.Rngs(0))
  pres = {"image": jnp.array([False, True, True, True])}
  a, _ = model(batch["image"], batch["question_ids"], batch["question_mask"], pres)
  b, _ = model(batch["image"].at[0].set(jnp.nan), batch["question_ids"], batch["question_mask"], pres)
  np.testing.assert_array_equal(a, b)
  c, _ = model(batch["image"].at[1].set(0.5), batch["question_ids"], batch["question_mask"], pres)
  assert not np.allclose(a[1], c[1])


@pytest.mark.parametrize("question_tokens", ["pooled", "all"])
def test_question_tokens_reach_the_fusion(data_dir, batch, question_tokens):
  task = _task(data_dir, "cross_attention", f"model.question_tokens={question_tokens}")
  task.config.model.fusion_kwargs.attention_maps = True  # the block returns its maps only when asked
  model = task.build_model(nnx.Rngs(0))
  _, aux = model(batch["image"], batch["question_ids"], batch["question_mask"])
  maps = aux["fusion"]["cross_attention"]["text"]["image"]  # (depth, B*Q, H, N_text, N_image)
  # one query (the pooled question) or every token position of the padded question
  assert maps.shape[3] == (1 if question_tokens == "pooled" else batch["question_ids"].shape[-1])
  np.testing.assert_allclose(maps.sum(-1), 1.0, atol=1e-5)  # no image token is absent here


def test_bad_inputs_are_named(data_dir, batch):
  model = _task(data_dir, "concat").build_model(nnx.Rngs(0))
  with pytest.raises(ValueError, match="images"):
    model(batch["image"][:, :64], batch["question_ids"])
  with pytest.raises(ValueError, match="question_ids"):
    model(batch["image"], batch["question_ids"].astype(jnp.float32))
  with pytest.raises(ValueError, match="batch size"):
    model(batch["image"][:2], batch["question_ids"])
  with pytest.raises(ValueError, match="question_tokens"):
    _task(data_dir, "concat", "model.question_tokens=first").build_model(nnx.Rngs(0))
  # presence: one (B,) bool per image and modality, each named
  with pytest.raises(ValueError, match=r"presence\['text'\]: expected shape \(B,\) = \(4,\), one per image, got \(8,\)"):
    model(batch["image"], batch["question_ids"], presence={"text": jnp.ones(8, bool)})
  with pytest.raises(ValueError, match=r"presence: keys \['audio'\] unknown"):
    model(batch["image"], batch["question_ids"], presence={"audio": jnp.ones(4, bool)})


def test_modality_dropout_may_drop_a_modality_left_out_of_presence(data_dir, batch, monkeypatch):
  """A modality that `presence` does not name is present, and modality dropout may drop it: with
  only the image named, the dropout used to see the image alone and (keeping one) never drop."""
  import mmjax.models.vqa as vqa_module

  seen = []
  real = vqa_module.modality_dropout
  monkeypatch.setattr(vqa_module, "modality_dropout", lambda base, *a: seen.append(sorted(base)) or real(base, *a))
  model = _task(data_dir, "concat", "model.modality_dropout=0.5").build_model(nnx.Rngs(0))
  for presence in (None, {"image": jnp.ones(4, bool)}):
    model(batch["image"], batch["question_ids"], batch["question_mask"], presence, deterministic=False)
  assert seen == [["image", "text"], ["image", "text"]]


def test_eval_metrics_match_numpy(data_dir, batch):
  """eval_fn + summarize: accuracy overall, per kind, per subtype and (non-relational) per named
  colour equal a numpy count over the valid rows; a padded row counts nowhere."""
  from mmjax.data import scenes  # noqa: PLC0415
  from mmjax.data.datasets import sort_of_clevr  # noqa: PLC0415
  task = _task(data_dir, "concat")
  model = task.build_model(nnx.Rngs(0))
  valid = np.array([True, True, True, False])
  logits, _ = model(batch["image"], batch["question_ids"], batch["question_mask"])
  got = task.summarize(jax.device_get(task.eval_fn(model, {**batch, "valid": jnp.asarray(valid)})))
  ok = (np.asarray(logits).argmax(-1) == np.asarray(batch["answer"]))[valid]
  kind, sub, color = (np.asarray(batch[k])[valid] for k in ("kind", "subtype", "color"))
  want = {"accuracy": ok.mean()}
  want.update({f"accuracy_{n}": ok[kind == k].mean() for k, n in enumerate(sort_of_clevr.KINDS)})
  want.update({f"accuracy_{n}": ok[sub == k].mean() for k, n in enumerate(sort_of_clevr.SUBTYPES)})
  nonrel = kind == sort_of_clevr.KINDS.index("non_relational")
  for c, n in enumerate(scenes.COLORS):
    sel = nonrel & (color == c)
    want[f"accuracy_non_relational_{n}"] = ok[sel].mean() if sel.any() else 0.0
  assert set(got) == set(want)
  for k in want:
    assert float(got[k]) == pytest.approx(want[k], abs=1e-12), k
  assert 0.0 < ok.mean() < 1.0  # an untrained model: the check is not vacuous


def test_prior_baseline_is_each_subtypes_majority_answer(data_dir):
  """prior_baseline: every test question answered with its subtype's most frequent train answer;
  equals a count over the raw records, per subtype, per kind and overall."""
  from collections import Counter  # noqa: PLC0415
  from mmjax.data.datasets import sort_of_clevr  # noqa: PLC0415
  task = _task(data_dir, "concat")
  train, test = ([src[i] for i in range(len(src))] for src in (task.source("train"), task.source("test")))
  counts = [Counter() for _ in sort_of_clevr.SUBTYPES]
  for r in train:
    for a, t in zip(r["answers"], r["subtypes"]):
      counts[t][int(a)] += 1
  majority = [max(sorted(c), key=c.__getitem__) for c in counts]  # ties: the lower answer index
  rows = [(int(t), int(k), a == majority[t]) for r in test
          for a, t, k in zip(r["answers"], r["subtypes"], r["kinds"])]
  want = {"accuracy": np.mean([ok for _, _, ok in rows])}
  for i, name in enumerate(sort_of_clevr.SUBTYPES):
    want[f"accuracy_{name}"] = np.mean([ok for t, _, ok in rows if t == i])
  for i, name in enumerate(sort_of_clevr.KINDS):
    want[f"accuracy_{name}"] = np.mean([ok for _, k, ok in rows if k == i])
  got = task.prior_baseline("test")
  for k, v in want.items():
    assert got[k] == pytest.approx(v, abs=1e-12), k
  best_constant = max(Counter(int(a) for r in test for a in r["answers"]).values()) / len(rows)
  assert got["accuracy"] > best_constant + 0.1  # 0.45 vs 0.27: a bar far above any constant answer


def test_majority_answers():
  from mmjax.metrics.vqa import majority_answers  # noqa: PLC0415
  got = majority_answers(np.array([[3, 3, 2], [2, 5, 5]]), np.array([[0, 0, 0], [1, 1, 4]]),
                         np.array([[4, 0], [1, 1]]))
  np.testing.assert_array_equal(got, [[5, 3], [2, 2]])  # type 1: a 2-5 tie goes to 2
  with pytest.raises(ValueError, match=r"types: \[2\] never occur"):
    majority_answers(np.array([1, 2]), np.array([0, 1]), np.array([0, 2]))
