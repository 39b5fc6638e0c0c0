"""TrainInput: batch contract, per-process partition, exact resume, determinism, mixture rates, negative filling."""

import json

import numpy as np
import pytest

from xtr_jax import tokenization
from xtr_jax.data import input_pipeline as ip


@pytest.fixture(scope="module")
def t5_tok(t5_vocab):
  return tokenization.SentencePieceTokenizer(t5_vocab)


def _jsonl(tmp_path, name, n, *, with_negative=True):
  path = tmp_path / f"{name}.jsonl"
  with open(path, "w", encoding="utf-8") as f:
    for i in range(n):
      row = {"query_id": f"{name}-{i}", "query": f"Question {i} about {name}?", "positive": f"Answer {i} of {name}."}
      if with_negative and i % 3:
        row["negative"] = f"Unrelated text {i} in {name}."
      f.write(json.dumps(row) + "\n")
  return str(path)


def _make(tok, sources, **kw):
  args = dict(global_batch_size=8, query_max_len=12, doc_max_len=16, num_negatives=2, seed=3, process_index=0,
              process_count=1, include_example_ids=True)
  args.update(kw)
  return ip.TrainInput(sources=sources, tokenizer=tok, **args)


def test_batch_contract_on_real_data(data_dir, t5_tok):
  src = ip.tsv_triples_source(path=str(data_dir / "train" / "msmarco-triples-first100.tsv"), name="msmarco")
  ti = ip.TrainInput(sources=[src], tokenizer=t5_tok, global_batch_size=8, query_max_len=32, doc_max_len=512,
                     num_negatives=1, seed=0, process_index=0, process_count=1)
  batch = next(ti)
  assert set(batch) == set(ip.BATCH_KEYS)
  for key, (shape, dtype) in ti.shapes.items():
    assert batch[key].shape == shape and batch[key].dtype == dtype, key
  assert batch["doc_tokens"].shape == (8, 2, 512)
  for toks, mask in ((batch["query_tokens"], batch["query_mask"]), (batch["doc_tokens"], batch["doc_mask"])):
    np.testing.assert_array_equal(mask, toks != 0)
    lengths = mask.sum(-1)
    assert (lengths >= 2).all()
    last = np.take_along_axis(toks, (lengths - 1)[..., None], axis=-1)[..., 0]
    assert (last == 1).all()  # EOS closes every sequence
    assert ((toks == 1).sum(-1) == 1).all()  # exactly one EOS
    # mask is a prefix: no valid token after padding
    assert (np.diff(mask.astype(np.int8), axis=-1) <= 0).all()
  # Row 0 is exactly the T5 tokenization of a lowercased example: find it among the source's examples.
  texts = {ip.tokenization.preprocess_query(e.query): e for e in ti.examples[0]}
  row_q = t5_tok._sp.DecodeIds([int(t) for t in batch["query_tokens"][0] if t > 1])
  ex = texts[row_q]
  want, _ = t5_tok.batch_encode([ex.positive.lower(), ex.negatives[0].lower()], 512)
  np.testing.assert_array_equal(batch["doc_tokens"][0], want)


def test_two_processes_partition_exactly(tmp_path, t5_tok):
  srcs = lambda: [ip.jsonl_source(path=_jsonl(tmp_path, "a", 37), name="a")]
  seen = []
  for p in range(2):
    ti = _make(t5_tok, srcs(), process_index=p, process_count=2)
    assert ti.batch_size == 4
    n_shard = len(ti.examples[0])
    ids = []
    while len(ids) < n_shard:
      ids.extend(next(ti)["example_id"].tolist())
    first_epoch = ids[:n_shard]
    assert len(set(first_epoch)) == n_shard  # each example of the shard once per epoch
    seen.append(set(first_epoch))
  assert not seen[0] & seen[1]  # nothing duplicated across processes
  assert seen[0] | seen[1] == {f"a-{i}" for i in range(37)}  # nothing lost
  assert {int(i.split("-")[1]) % 2 for i in seen[1]} == {1}  # process 1 read only its lines


def test_resume_reproduces_next_batches_exactly(tmp_path, t5_tok):
  def srcs():
    return [ip.jsonl_source(path=_jsonl(tmp_path, "a", 13), name="a", rate=2.0),
            ip.jsonl_source(path=_jsonl(tmp_path, "b", 7, with_negative=False), name="b", rate=1.0)]
  ref = _make(t5_tok, srcs())
  ref_batches = [next(ref) for _ in range(9)]
  run = _make(t5_tok, srcs())
  for _ in range(4):
    next(run)
  state = json.loads(json.dumps(run.get_state()))  # what a checkpoint stores
  resumed = _make(t5_tok, srcs())
  resumed.set_state(state)
  for want in ref_batches[4:]:
    got = next(resumed)
    assert set(got) == set(want)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key], err_msg=key)
  # the batches really cross epochs of both sources (so the cursors' epoch part is exercised)
  assert resumed.get_state()["cursors"][0][0] >= 2 and resumed.get_state()["cursors"][1][0] >= 1


def test_deterministic_given_seed_and_seed_matters(tmp_path, t5_tok):
  path = _jsonl(tmp_path, "a", 50)
  a = [next(_make(t5_tok, [ip.jsonl_source(path=path, name="a")]))["example_id"] for _ in range(2)]
  ti1 = _make(t5_tok, [ip.jsonl_source(path=path, name="a")])
  ti2 = _make(t5_tok, [ip.jsonl_source(path=path, name="a")], seed=4)
  np.testing.assert_array_equal(a[0], a[1])
  assert [next(ti1)["example_id"].tolist() for _ in range(3)] != [next(ti2)["example_id"].tolist() for _ in range(3)]


def test_state_from_another_config_is_refused(tmp_path, t5_tok):
  path = _jsonl(tmp_path, "a", 20)
  ti = _make(t5_tok, [ip.jsonl_source(path=path, name="a")])
  next(ti)
  state = ti.get_state()
  other = _make(t5_tok, [ip.jsonl_source(path=path, name="a")], seed=99)
  with pytest.raises(ValueError, match="'seed' is 3 in the state but 99 here"):
    other.set_state(state)
  other = _make(t5_tok, [ip.jsonl_source(path=path, name="a")], process_index=1, process_count=2)
  with pytest.raises(ValueError, match="process_index"):
    other.set_state(state)


def test_mixture_rates(tmp_path, t5_tok):
  srcs = [ip.jsonl_source(path=_jsonl(tmp_path, "a", 30), name="a", rate=3.0),
          ip.jsonl_source(path=_jsonl(tmp_path, "b", 30), name="b", rate=1.0)]
  ti = _make(t5_tok, srcs, global_batch_size=64, doc_max_len=4, query_max_len=4)
  counts = np.bincount(np.concatenate([next(ti)["source"] for _ in range(20)]), minlength=2)
  frac = counts[0] / counts.sum()
  assert abs(frac - 0.75) < 0.04, counts  # 1280 draws: 4 sigma ~ 0.05


def test_missing_negatives_filled_from_other_positives(tmp_path, t5_tok):
  ti = _make(t5_tok, [ip.jsonl_source(path=_jsonl(tmp_path, "b", 9, with_negative=False), name="b")],
             num_negatives=3, include_example_ids=True)
  pool = {t5_tok._sp.DecodeIds(t5_tok.pieces(e.positive.lower())) for e in ti.examples[0]}
  batch = next(ti)
  for row in range(ti.batch_size):
    docs = [t5_tok._sp.DecodeIds([int(t) for t in d if t > 1]) for d in batch["doc_tokens"][row]]
    assert len(set(docs)) == 4 and set(docs) <= pool  # distinct, all real positives of the source
  # Same filling with the same seed, independent of the process layout.
  ex = ti.examples[0][0]
  texts = [ip.example_texts(ex, 3, ti._pools[0], seed=3, source_name="b") for _ in range(2)]
  assert texts[0] == texts[1]


def test_config_errors(tmp_path, t5_tok):
  src = ip.jsonl_source(path=_jsonl(tmp_path, "a", 5), name="a")
  with pytest.raises(ValueError, match="not divisible by process_count 3"):
    _make(t5_tok, [src], process_count=3)
  with pytest.raises(ValueError, match="source names must be unique"):
    _make(t5_tok, [src, src])
  with pytest.raises(FileNotFoundError, match="does not exist"):
    ip.TrainInput(sources=[src], global_batch_size=2, vocab_path=str(tmp_path / "missing.model"),
                  process_index=0, process_count=1)
  bad = tmp_path / "bad.model"
  bad.write_bytes(b"junk")
  with pytest.raises(ValueError, match="not a SentencePiece model"):
    ip.TrainInput(sources=[src], global_batch_size=2, vocab_path=str(bad), process_index=0, process_count=1)


def test_bert_vocab_and_gin(tmp_path, bert_vocab):
  import gin
  path = _jsonl(tmp_path, "a", 10)
  gin.parse_config([f"xtr_jsonl_source.path = '{path}'", "TrainInput.sources = [@xtr_jsonl_source()]",
                    "TrainInput.global_batch_size = 4", f"TrainInput.vocab_path = '{bert_vocab}'",
                    "TrainInput.doc_max_len = 10", "TrainInput.query_max_len = 8"])
  ti = ip.TrainInput()
  assert (ti.process_index, ti.process_count) == (0, 1)  # from jax when not given
  batch = next(ti)
  assert batch["doc_tokens"].shape == (4, 2, 10)
  q = batch["query_tokens"]
  assert (q[:, 0] == 101).all()  # [CLS]
  lengths = batch["query_mask"].sum(-1)
  assert (q[np.arange(4), lengths - 1] == 102).all()  # [SEP] closes, then padding 0


def test_token_cache_never_changes_output(data_dir, t5_tok):
  path = str(data_dir / "train" / "squad-v1.1-dev-pairs.jsonl")  # paragraphs repeat across questions
  runs = []
  for cache in (0, 7, 4096):  # off, constantly evicting, large
    ti = _make(t5_tok, [ip.jsonl_source(path=path, name="squad")], doc_max_len=64, token_cache_size=cache,
               global_batch_size=400, process_index=1, process_count=50)  # 212-example shard
    runs.append([next(ti) for _ in range(30)])  # 240 rows of 8: more than one epoch of the shard
  for other in runs[1:]:
    for want, got in zip(runs[0], other):
      for key in ip.BATCH_KEYS:
        np.testing.assert_array_equal(got[key], want[key])


def test_source_skip_bad_lines_and_zero_negatives(tmp_path, t5_tok):
  path = tmp_path / "messy.jsonl"
  path.write_text('{"query": "a", "positive": "p a"}\n{"query": "b"\n{"query": "c", "positive": "p c"}\n',
                  encoding="utf-8")
  with pytest.raises(ip.training_files.TrainingFileError, match=r"messy.jsonl:2: malformed JSON"):
    _make(t5_tok, [ip.jsonl_source(path=str(path), name="m")])
  ti = _make(t5_tok, [ip.jsonl_source(path=str(path), name="m", skip_bad_lines=True)], global_batch_size=2,
             num_negatives=0)
  assert sorted(e.query for e in ti.examples[0]) == ["a", "c"]
  batch = next(ti)
  assert batch["doc_tokens"].shape == (2, 1, 16) and sorted(batch["example_id"]) == ["messy.jsonl:1", "messy.jsonl:3"]
