"""Generation controls on the tiny float32 model: log-probabilities equal stock PEFT's,
`n` samples share one prefill and each seed reproduces, and penalties, bias, min_tokens,
stop token ids and ignore_eos each do what defines them, row by row in a mixed batch."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel

from loraplex.core.errors import InvalidRequest
from loraplex.core.model import eos_ids_of
from loraplex.server.engine.controls import RowControls, apply_controls
from loraplex.server.engine.output import OutputProcessor
from loraplex.server.engine.request import EngineRequest, SamplingParams
from loraplex.server.engine.sampling import sampled_rows, warp
from tests.server.engine.test_engine import Collector, submit

PROMPT = [5, 17, 300, 42, 7, 99, 1000, 3]


@pytest.fixture
def reference(load_tiny, tmp_path):
    """Stock PEFT over a fresh copy of the tiny model, with the engine's adapters (the
    `setup` fixture saves them under tmp_path/peft)."""

    def load(adapter: str) -> PeftModel:
        model = PeftModel.from_pretrained(load_tiny().model, tmp_path / "peft" / adapter)
        return model.eval()

    return load


def peft_log_softmax(model: PeftModel, ids: list[int]) -> torch.Tensor:
    """(len(ids), V): position i's log-probabilities of the next token."""
    with torch.inference_mode():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)


def finished(*collectors: Collector) -> None:
    for c in collectors:
        assert c.done.wait(60) and c.error is None, c.error


def test_logprobs_equal_pefts_in_a_mixed_batch(setup, reference):
    engine, versions = setup()
    asked = submit(engine, PROMPT, versions["one"], max_new_tokens=6, logprobs=5, prompt_logprobs=3)
    neighbours = [
        submit(engine, [9, 8, 7], versions["two"], logprobs=2),
        submit(engine, [1, 2, 3, 4], None, temperature=1.0, seed=3),
    ]
    finished(asked, *neighbours)
    tokens = asked.tokens
    want = peft_log_softmax(reference("one"), PROMPT + tokens)  # (L, V)

    generated = [lp for o in asked.outputs for lp in o.logprobs]
    assert [lp.token_id for lp in generated] == tokens
    for j, lp in enumerate(generated):
        row = want[len(PROMPT) - 1 + j]
        assert lp.logprob == pytest.approx(row[tokens[j]].item(), abs=1e-4)
        values = [v for _, v in lp.top]
        assert values == sorted(values, reverse=True) and len(values) == 5
        best = torch.topk(row, 5)
        assert [t for t, _ in lp.top] == best.indices.tolist()
        torch.testing.assert_close(torch.tensor(values), best.values, atol=1e-4, rtol=0)
        assert lp.top[0] == (tokens[j], lp.logprob)  # greedy: the chosen token is the best

    prompt_lps = asked.outputs[0].prompt_logprobs
    assert prompt_lps is not None and prompt_lps[0] is None and len(prompt_lps) == len(PROMPT)
    assert all(o.prompt_logprobs is None for o in asked.outputs[1:])  # sent once
    for i, lp in enumerate(prompt_lps[1:], start=1):
        assert lp is not None and lp.token_id == PROMPT[i]
        assert lp.logprob == pytest.approx(want[i - 1, PROMPT[i]].item(), abs=1e-4)
        assert [t for t, _ in lp.top] == torch.topk(want[i - 1], 3).indices.tolist()
    # only the rows that asked carry log-probabilities, each its own
    assert all(len(o.logprobs[0].top) == 2 for o in neighbours[0].outputs)
    assert all(o.logprobs is None for o in neighbours[1].outputs)


def test_prompt_logprobs_span_prefill_chunks(setup, reference):
    """A prompt prefilled over several steps scores every token, as one forward does."""
    engine, versions = setup(max_prefill_tokens=3)
    prompt = [(11 * i) % 2000 + 30 for i in range(10)]
    c = submit(engine, prompt, versions["two"], max_new_tokens=1, prompt_logprobs=0)
    finished(c)
    want = peft_log_softmax(reference("two"), prompt)
    got = c.outputs[0].prompt_logprobs
    assert got is not None and len(got) == len(prompt)
    for i in range(1, len(prompt)):
        assert got[i] is not None and got[i].top == ()
        assert got[i].logprob == pytest.approx(want[i - 1, prompt[i]].item(), abs=1e-4)


def by_index(c: Collector, n: int) -> list[list[int]]:
    samples: list[list[int]] = [[] for _ in range(n)]
    for o in c.outputs:
        samples[o.index] += o.token_ids
    return samples


class Samples(Collector):
    """Collects a request with n samples: done once each has finished."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n

    def __call__(self, item):
        if isinstance(item, BaseException):
            self.error = item
            self.done.set()
            return
        self.outputs.append(item)
        if sum(o.finish_reason is not None for o in self.outputs) == self.n:
            self.done.set()


def test_n_samples_share_one_prefill_and_each_seed_reproduces(setup):
    engine, versions = setup()
    n, seed = 4, 1234
    before = engine.snapshot().result(30).stats.prefill_tokens
    c = Samples(n)
    params = SamplingParams(10, temperature=1.0, seed=seed, ignore_eos=True, n=n, logprobs=0)
    engine.submit(EngineRequest("fan", PROMPT, params, versions["one"], c))
    finished(c)
    after = engine.snapshot().result(30)
    assert after.stats.prefill_tokens - before == len(PROMPT)  # the prompt ran once
    samples = by_index(c, n)
    assert all(len(s) == 10 for s in samples) and len({tuple(s) for s in samples}) > 1
    ends = [o for o in c.outputs if o.finish_reason is not None]
    assert sorted(o.index for o in ends) == list(range(n))
    assert all(o.usage.completion_tokens == 10 for o in ends)
    assert after.running == 0 and all(s.refcount == 0 for s in after.slots)
    # sample i draws from seed + i: alone, with that seed, it gives the same tokens
    for i in (0, 3):
        alone = submit(engine, PROMPT, versions["one"], 10, temperature=1.0, seed=seed + i)
        finished(alone)
        assert alone.tokens == samples[i]


def test_n_samples_beyond_the_batch_are_refused(setup):
    engine, _ = setup(max_batch_size=4)
    with pytest.raises(InvalidRequest, match="8 samples"):
        engine.submit(EngineRequest("r", PROMPT, SamplingParams(4, n=8), None, Collector()))
    with pytest.raises(InvalidRequest, match="n"):
        SamplingParams(4, n=17)


def replay_controls(logits: torch.Tensor, params: SamplingParams, prompt, output):
    """A row's controlled logits, written out plainly per token (the reference)."""
    x = logits.clone()
    for token, bias in params.logit_bias:
        x[token] += bias
    for token in set(prompt) | set(output):
        p = params.repetition_penalty
        x[token] = x[token] / p if x[token] > 0 else x[token] * p
    for token in set(output):
        x[token] -= params.frequency_penalty * output.count(token) + params.presence_penalty
    return x


REPEATING = [5, 5, 5, 5]  # a prompt after which the tiny base model repeats one token


@pytest.mark.parametrize(
    "controls",
    [
        {"presence_penalty": 1.5},
        {"frequency_penalty": 0.7},
        {"repetition_penalty": 3.0},
        {"presence_penalty": 0.8, "frequency_penalty": 1.5, "repetition_penalty": 1.7},
    ],
    ids=["presence", "frequency", "repetition", "all"],
)
def test_penalties_follow_their_definitions_token_by_token(setup, reference, controls):
    """Greedy with penalties on a prompt where the base model repeats one token: each token
    is the argmax of PEFT's logits with the controls applied as written (HF's repetition,
    OpenAI's frequency and presence), and the neighbour without controls is untouched."""
    engine, _ = setup()
    plain_alone = submit(engine, REPEATING, None, max_new_tokens=16)
    finished(plain_alone)
    assert max(plain_alone.tokens.count(t) for t in plain_alone.tokens) > 3
    bias = ((REPEATING[0], 3.0),)
    params = SamplingParams(16, logit_bias=bias, ignore_eos=True, **controls)
    c = Collector()
    engine.submit(EngineRequest("pen", REPEATING, params, None, c))
    plain = submit(engine, REPEATING, None, max_new_tokens=16)
    biased = submit(engine, REPEATING, None, max_new_tokens=16, logit_bias=bias)
    finished(c, plain, biased)
    assert plain.tokens == plain_alone.tokens
    assert c.tokens != biased.tokens  # the penalties changed what was chosen
    model = reference("one")
    with torch.inference_mode(), model.disable_adapter():
        logits = model(torch.tensor([REPEATING + c.tokens])).logits[0].float()
    for j, token in enumerate(c.tokens):
        row = replay_controls(logits[len(REPEATING) - 1 + j], params, REPEATING, c.tokens[:j])
        top2 = torch.topk(row, 2)
        if top2.values[0] - top2.values[1] > 1e-4:  # not a near tie
            assert token == top2.indices[0].item(), j


def test_controls_touch_only_their_rows():
    params = SamplingParams(4, frequency_penalty=2.0, logit_bias=((1, 5.0),))
    controls = RowControls.create(params, [0], set(), vocab_size=8, device=torch.device("cpu"))
    assert controls is not None
    controls.accept(3)
    controls.accept(3)
    logits = torch.zeros(3, 8)
    out = apply_controls(logits, [None, controls, None])
    assert torch.equal(out[0], logits[0]) and torch.equal(out[2], logits[2])
    assert out[1, 3] == -4.0 and out[1, 1] == 5.0 and torch.count_nonzero(out[1]) == 2
    assert torch.count_nonzero(logits) == 0  # the raw logits stay (log-probabilities)
    assert apply_controls(logits, [None, None, None]) is logits
    nothing = RowControls.create(SamplingParams(4), [0], {2}, 8, torch.device("cpu"))
    assert nothing is None  # no control: no per-row work


def test_min_p_keeps_tokens_near_the_best():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.5, 0.3, 0.15, 0.05]]))
    ps = [SamplingParams(1, temperature=1.0, min_p=0.35), SamplingParams(1, temperature=1.0)]
    rows = sampled_rows(ps, [None, None], 4, torch.device("cpu"))
    kept = torch.isfinite(warp(logits, rows))
    # 0.15 < 0.35 * 0.5: out; 0.3 stays; the row without min_p keeps everything
    assert kept.tolist() == [[True, True, False, False], [True] * 4]


def test_stop_token_ids_min_tokens_and_ignore_eos(setup, load_tiny):
    engine, versions = setup()
    free = submit(engine, PROMPT, versions["two"], max_new_tokens=8)
    finished(free)
    tokens = free.tokens
    stop = tokens[2]
    first = tokens.index(stop)
    c = submit_params(engine, versions["two"], SamplingParams(8, stop_token_ids=(stop,)))
    assert c.tokens == tokens[: first + 1]
    last = c.outputs[-1]
    assert (last.finish_reason, last.stop_reason) == ("stop", stop)
    # min_tokens: the stop token is out until 5 tokens are out
    held = submit_params(
        engine, versions["two"], SamplingParams(8, stop_token_ids=(stop,), min_tokens=5)
    )
    assert stop not in held.tokens[:5]
    assert held.outputs[-1].finish_reason == "length" or len(held.tokens) > 5

    eos = min(eos_ids_of(load_tiny().model, engine.info.tokenizer))
    to_eos = SamplingParams(5, logit_bias=((eos, 100.0),))
    ended = submit_params(engine, versions["two"], to_eos)
    assert ended.tokens == [eos] and ended.outputs[-1].finish_reason == "stop"
    assert ended.outputs[-1].stop_reason is None  # an end-of-sequence token, not a stop token
    kept = submit_params(engine, versions["two"], SamplingParams(5, logit_bias=((eos, 100.0),),
                                                                  ignore_eos=True))  # fmt: skip
    assert kept.tokens == [eos] * 5 and kept.outputs[-1].finish_reason == "length"
    late = submit_params(
        engine, versions["two"], SamplingParams(5, logit_bias=((eos, 100.0),), min_tokens=3)
    )
    assert eos not in late.tokens[:3] and late.tokens[3] == eos


def submit_params(engine, adapter, params: SamplingParams) -> Collector:
    c = Collector()
    engine.submit(EngineRequest(f"r{id(c)}", PROMPT, params, adapter, c))
    finished(c)
    return c


class Tokens:
    """A tokenizer stand-in: token i is the character chr(i)."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


def test_stop_strings_wait_for_min_tokens_and_may_stay_in_the_text():
    kept = OutputProcessor(Tokens(), ("ab",), include_stop=True)
    assert [kept.append(ord(c)).stop_reason for c in "xab"] == [None, None, "ab"]
    assert kept.text == "xab"
    late = OutputProcessor(Tokens(), ("ab",), min_tokens=4)
    reasons = [late.append(ord(c)).stop_reason for c in "abxab"]
    assert reasons == [None, None, None, None, "ab"] and late.text == "abx"


def test_a_constraint_holds_its_rows_and_leaves_its_neighbours_alone(setup):
    """Constrained sequences (a regex, a choice; two samples of one) share steps with
    unconstrained ones on other adapters: each constrained output matches, each neighbour's
    tokens equal what it gets alone (float32: batch shapes do not move logits)."""
    import re

    from loraplex.server.engine.structured import ConstraintSpec, GrammarCompiler

    engine, versions = setup()
    info = engine.info
    grammars = GrammarCompiler(info.tokenizer, info.vocab_size, eos_token_ids=info.eos_token_ids)
    pattern = r"[a-z]{2,5}-[0-9]{2}"
    regex = grammars.compile(ConstraintSpec("regex", pattern, "structured_outputs.regex"))
    choice = grammars.compile(ConstraintSpec("choice", '["alpha", "beta"]', "choice"))
    alone = [submit(engine, PROMPT, versions["one"]), submit(engine, [9, 8, 7], None)]
    finished(*alone)
    constrained = []
    for i, (compiled, adapter) in enumerate([(regex, versions["two"]), (choice, None)]):
        c = Samples(2)
        params = SamplingParams(20, temperature=1.0, seed=i, n=2)
        engine.submit(EngineRequest(f"c{i}", PROMPT, params, adapter, c, constraint=compiled))
        constrained.append(c)
    beside = [submit(engine, PROMPT, versions["one"]), submit(engine, [9, 8, 7], None)]
    finished(*constrained, *beside)
    assert [c.tokens for c in beside] == [c.tokens for c in alone]
    decode = info.tokenizer.decode
    for c, check in zip(
        constrained,
        [lambda t: re.fullmatch(pattern, t), lambda t: t in ("alpha", "beta")],
        strict=True,
    ):
        for sample in by_index(c, 2):
            assert check(decode(sample, skip_special_tokens=True)), decode(sample)
        assert all(o.finish_reason == "stop" for o in c.outputs if o.finish_reason)
