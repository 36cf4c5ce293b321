"""Text generation with a causal LM: batched, left-padded, one preallocated KV cache."""

from __future__ import annotations

import contextlib
import logging
import operator
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from os import PathLike
from typing import Any

import torch

from ..errors import InputError, RegistryXFError
from ..registry import registry
from .cuda_graph import DecodingGraph, RecordedSteps, check_recordable, launch_then_read
from .processors import LogitsProcessor, next_tokens
from .seq2seq import decoding_step, is_encoder_decoder, seq2seq_steps, start_decoding
from .settings import GenerationSettings, SettingsError
from .stopping import GenerationState, StoppingCriterion, StopStrings

REPLACEMENT_CHAR = "\ufffd"

logger = logging.getLogger(__name__)


@dataclass
class GenerationStep:
    """One step of a batch: the token each sequence got, and which sequences are done.

    ``active`` marks the sequences for which ``tokens`` is a real new token (the others
    were done already and were fed padding); ``finished`` marks those done after the step.
    """

    tokens: torch.Tensor
    active: torch.Tensor
    finished: torch.Tensor


class Generator:
    """Generates text, or token ids, with a causal language model or an encoder-decoder.

    ``model`` is a :class:`~registry_xf.assemblies.decoder.CausalLM` (anything with
    ``new_cache`` and ``forward(..., cache=, last_only=)`` giving ``.logits``), a
    :class:`~registry_xf.assemblies.encoder_decoder.Seq2SeqLM`, or any source
    ``registry_xf.load`` takes (a Hub id, a directory, a package, a ``.cfg``), loaded on the
    CPU as stored; ``tokenizer`` defaults to the model's. ``settings`` are the defaults of
    every call, which each call may override by keyword (see :class:`GenerationSettings`).
    ``logits_processors`` and ``stopping_criteria`` are extra pieces, applied after the
    ones the settings ask for.

    ``compile=True`` runs the model through ``torch.compile`` (whole graph, dynamic
    shapes): the first prompt and the first decoding step each compile once (tens of
    seconds on a CPU), after which every step runs as one fused graph, whatever the
    batch size, prompt length or step (an encoder-decoder's prompt graph holds the
    encoder, the cross-attention keys and values and the start token). Worth it for long
    or repeated generation.

    ``cuda_graphs=True`` records the decoding step in a CUDA graph and replays it for
    every new token (see :mod:`~registry_xf.generation.cuda_graph`): at small batches a
    step is then no longer bound by the host launching its kernels. A causal LM's step
    is recorded once per batch size and cache length (in blocks of 128 slots), and the
    four used last are kept, with their caches, for later calls; an encoder-decoder's is
    recorded once per call (it reads that call's encoder memory). It combines with
    ``compile=True`` (the compiled step is what is recorded). On a device other than
    CUDA the steps run in the same fixed shape, unrecorded, and a warning says so.
    """

    def __init__(
        self,
        model: torch.nn.Module | str | PathLike[str],
        *,
        tokenizer: Any = None,
        settings: GenerationSettings | Mapping[str, Any] | None = None,
        logits_processors: Sequence[LogitsProcessor] = (),
        stopping_criteria: Sequence[StoppingCriterion] = (),
        compile: bool = False,
        cuda_graphs: bool = False,
    ):
        if not isinstance(model, torch.nn.Module):
            # A source (Hub id, directory, package, .cfg): loaded on the CPU as stored. The
            # import is here so that generation knows nothing of loading until asked to load.
            from ..loading.load import load

            model = load(model)
        if not (callable(getattr(model, "new_cache", None)) and hasattr(model, "lm_head")):
            raise RegistryXFError(
                f"Generator needs a causal language model (registry_xf.CausalLM.v1); "
                f"found {type(model).__name__}"
            )
        self.model = model
        self.tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
        if isinstance(settings, Mapping):
            settings = GenerationSettings(**settings)
        self.settings = settings if settings is not None else GenerationSettings()
        self.extra_processors = list(logits_processors)
        self.extra_criteria = list(stopping_criteria)
        if cuda_graphs:
            check_recordable(model)
        self.cuda_graphs = cuda_graphs
        self._warned_unrecorded = False
        self.compiled = compile
        self._forward = compile_for_generation(model) if compile else model
        self._recorded = RecordedSteps(model, self._forward)
        # an encoder-decoder's two graphs: the prompt (encoder, cross-attention keys and
        # values, the decoder's start token), and one decoding step
        self._start, self._step = start_decoding, decoding_step
        if compile and is_encoder_decoder(model):
            self._start = compile_for_generation(start_decoding)
            self._step = compile_for_generation(decoding_step)

    # -- what a call is made of ---------------------------------------------------------

    def settings_for(self, **overrides: Any) -> GenerationSettings:
        """The generator's settings with ``overrides``; a misspelt name is a SettingsError."""
        return self.settings.updated(**overrides)

    @property
    def vocab_size(self) -> int:
        return int(self.model.lm_head.out_features)

    def model_generation(self) -> Mapping[str, Any]:
        """The model config's ``[generation]`` section (what its checkpoint's HF generation
        config says), or an empty one."""
        config = getattr(self.model, "config", None)
        generation = config.get("generation") if isinstance(config, Mapping) else None
        return generation if isinstance(generation, Mapping) else {}

    def default_eos_token_ids(self) -> list[int]:
        """The model's end-of-sequence ids (its config's ``[generation]``), else the
        tokenizer's end-of-sequence token, else none."""
        value = self.model_generation().get("eos_token_ids")
        if value is not None:
            return _id_list(value)
        return tokenizer_eos_ids(self.tokenizer)

    def eos_token_ids(self, settings: GenerationSettings) -> list[int]:
        if settings.eos_token_ids is not None:
            return list(settings.eos_token_ids)
        return self.default_eos_token_ids()

    @property
    def pad_id(self) -> int:
        """The id that left-pads prompts and is fed to finished sequences."""
        pad = getattr(self.tokenizer, "pad_id", None) if self.tokenizer is not None else None
        if isinstance(pad, int) and 0 <= pad < self.vocab_size:
            return pad
        eos = self.default_eos_token_ids()
        return eos[0] if eos else 0

    def prompt_length(self, padded_width: int = 1) -> int:
        """How many ids precede the new ones in what processors see: the padded prompt of a
        causal model, the decoder's start token alone of an encoder-decoder."""
        return 1 if is_encoder_decoder(self.model) else padded_width

    def min_new_tokens(self, settings: GenerationSettings, prompt_length: int) -> int:
        """The setting, else the model's ``min_new_tokens``, else its ``min_length`` (as HF
        counts it: the prompt's padded length, or the decoder's start token, included)."""
        if settings.min_new_tokens is not None:
            return settings.min_new_tokens
        generation = self.model_generation()
        if generation.get("min_new_tokens") is not None:
            return int(generation["min_new_tokens"])
        return max(int(generation.get("min_length") or 0) - prompt_length, 0)

    def logits_processors(
        self, settings: GenerationSettings, prompt_length: int | None = None
    ) -> list[LogitsProcessor]:
        """The registered processors the settings and the model's ``[generation]`` ask for,
        in HF's order, then the extras. ``prompt_length`` is the padded prompt's length (a
        causal model's; an encoder-decoder's is its decoder start token, 1): the minimum
        length and the forced last token count from it."""
        get = registry.logits_processors.get
        generation = self.model_generation()
        if prompt_length is None:
            prompt_length = self.prompt_length()
        found: list[LogitsProcessor] = []
        if settings.repetition_penalty is not None and settings.repetition_penalty != 1.0:
            found.append(get("registry_xf.RepetitionPenalty.v1")(settings.repetition_penalty))
        no_repeat = settings.no_repeat_ngram_size
        if no_repeat is None:
            no_repeat = generation.get("no_repeat_ngram_size")
        if no_repeat:
            found.append(get("registry_xf.NoRepeatNGram.v1")(int(no_repeat)))
        if generation.get("suppress_token_ids"):
            suppressed = _id_list(generation["suppress_token_ids"])
            found.append(get("registry_xf.SuppressTokens.v1")(suppressed))
        eos = self.eos_token_ids(settings)
        least = self.min_new_tokens(settings, prompt_length)
        if least > 0 and eos:
            found.append(get("registry_xf.MinNewTokens.v1")(least, eos, prompt_length))
        if generation.get("forced_bos_token_id") is not None:
            forced = [int(generation["forced_bos_token_id"])]
            found.append(get("registry_xf.ForcedToken.v1")(forced, at_length=1))
        if generation.get("forced_eos_token_ids") is not None:
            forced = _id_list(generation["forced_eos_token_ids"])
            last = prompt_length + settings.max_new_tokens - 1
            found.append(get("registry_xf.ForcedToken.v1")(forced, at_length=last))
        if settings.sampling:
            assert settings.temperature is not None
            if settings.temperature != 1.0:
                found.append(get("registry_xf.Temperature.v1")(settings.temperature))
            if settings.top_k is not None:
                found.append(get("registry_xf.TopK.v1")(settings.top_k))
            if settings.top_p is not None and settings.top_p < 1.0:
                found.append(get("registry_xf.TopP.v1")(settings.top_p))
            if settings.min_p:
                found.append(get("registry_xf.MinP.v1")(settings.min_p))
        return found + self.extra_processors

    def stopping_criteria(self, settings: GenerationSettings) -> list[StoppingCriterion]:
        """The registered criteria the settings ask for, then the extras."""
        get = registry.stopping_criteria.get
        found: list[StoppingCriterion] = [
            get("registry_xf.MaxNewTokens.v1")(settings.max_new_tokens)
        ]
        eos = self.eos_token_ids(settings)
        if eos:
            found.append(get("registry_xf.EOSToken.v1")(eos))
        if settings.stop:
            if self.tokenizer is None:
                raise SettingsError("stop strings need a tokenizer to decode the new tokens")
            found.append(get("registry_xf.StopStrings.v1")(settings.stop))
        return found + self.extra_criteria

    # -- the public calls ---------------------------------------------------------------

    def generate(self, prompts: str | Sequence[str], **settings: Any) -> list[str]:
        """The new text for each prompt (a single prompt gives a list of one).

        Generation stops at an end-of-sequence token (not part of the text), after
        ``max_new_tokens``, or at a ``stop`` string (the text is cut before it).
        """
        s = self.settings_for(**settings)
        texts = [prompts] if isinstance(prompts, str) else list(prompts)
        new = self._generate(self.encode(texts), s)
        eos = self.eos_token_ids(s)
        return [self._text(ids, s, eos) for ids in new]

    def generate_ids(self, input_ids: Sequence[Sequence[int]], **settings: Any) -> list[list[int]]:
        """The new token ids for each prompt of ``input_ids`` (lists of ids, any lengths).

        A sequence that stopped early is shorter: it ends with the end-of-sequence token
        (or the token that completed a stop string) and is not padded.
        """
        return self._generate(input_ids, self.settings_for(**settings))

    def stream(self, prompt: str, **settings: Any) -> Iterator[str]:
        """Yield the new text of one prompt in pieces, as soon as each piece is stable.

        A piece is held back while the text ends with an incomplete character (a token
        holding part of a multi-byte character decodes to U+FFFD) or with what may be the
        beginning of a stop string. The pieces join to what ``generate`` returns.
        """
        s = self.settings_for(**settings)
        prompts = self.encode([prompt])
        self._check(prompts, s)
        eos = self.eos_token_ids(s)
        stops = StopStrings(s.stop)
        longest_stop = max((len(x) for x in stops.stop), default=0)
        emitted = 0
        new: list[int] = []
        for step in self._steps(prompts, s):
            new.append(int(step.tokens[0]))
            text = self._text(new, s, eos)
            if bool(step.finished[0]):
                break
            stable = text.rstrip(REPLACEMENT_CHAR)
            for k in range(min(len(stable), longest_stop - 1), 0, -1):
                if any(x.startswith(stable[-k:]) for x in stops.stop):
                    stable = stable[:-k]
                    break
            if len(stable) > emitted:
                yield stable[emitted:]
                emitted = len(stable)
        else:
            text = self._text(new, s, eos)
        if len(text) > emitted:
            yield text[emitted:]

    # -- the work -----------------------------------------------------------------------

    def _steady(self, after_first_step: bool) -> contextlib.AbstractContextManager:
        """How a decoding step runs. Compiled, every step after the first checks only the
        guards that tell the compiled graphs apart: the inputs are the generator's own,
        the same kinds every step, and the cache was sized for the whole generation."""
        if self.compiled and after_first_step and hasattr(torch.compiler, "set_stance"):
            return torch.compiler.set_stance(skip_guard_eval_unsafe=True)
        return contextlib.nullcontext()

    def _warn_if_unrecorded(self, device: torch.device) -> None:
        """Say once per generator that ``cuda_graphs=True`` gains nothing off CUDA."""
        if device.type != "cuda" and not self._warned_unrecorded:
            logger.warning(
                "cuda_graphs=True: the model is on %s, not a CUDA device; decoding steps "
                "run in the fixed shape a graph needs, unrecorded (no gain)",
                device,
            )
            self._warned_unrecorded = True

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each prompt, with the tokenizer's special tokens, not truncated."""
        if self.tokenizer is None:
            raise RegistryXFError(
                "this model has no tokenizer: pass Generator(model, tokenizer=...), or "
                "use generate_ids with token ids"
            )
        encodings = self.tokenizer.encode(list(texts), truncation=False)
        return [list(e.ids) for e in encodings]

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))

    def _text(self, ids: Sequence[int], s: GenerationSettings, eos: Sequence[int]) -> str:
        """The text of new ids: a final end-of-sequence token dropped, cut at a stop string."""
        if ids and ids[-1] in eos:
            ids = ids[:-1]
        return StopStrings(s.stop).cut(self.decode(ids))

    def _check(self, prompts: Sequence[Sequence[int]], s: GenerationSettings) -> None:
        """Refuse prompts the model cannot take, before any work is done."""
        vocab = self.vocab_size
        for i, prompt in enumerate(prompts):
            if len(prompt) == 0:
                raise InputError(f"prompt {i} is empty: generation needs at least one token")
            bad = [t for t in prompt if not 0 <= t < vocab]
            if bad:
                raise InputError(
                    f"prompt {i} has token ids outside the vocabulary [0, {vocab}): {bad[:5]}"
                )
        limit = getattr(self.model, "max_positions", None)
        longest = max(len(p) for p in prompts)
        if limit is not None and longest + s.max_new_tokens > limit:
            raise InputError(
                f"a prompt of {longest} tokens plus max_new_tokens={s.max_new_tokens} is "
                f"longer than the model's {limit} positions: shorten the prompt or ask for "
                f"at most {max(limit - longest, 0)} new tokens"
            )
        generation = self.model_generation()
        model_ids = [
            (f"the model's generation.{key}", _id_list(generation[key]))
            for key in ("forced_bos_token_id", "forced_eos_token_ids", "suppress_token_ids")
            if generation.get(key) is not None
        ]
        for source, ids in (
            ("eos_token_ids", self.eos_token_ids(s)),
            ("pad id", [self.pad_id]),
            *model_ids,
        ):
            outside = [t for t in ids if not 0 <= t < vocab]
            if outside:
                raise SettingsError(
                    f"{source} {outside} outside the model's vocabulary [0, {vocab})"
                )

    def _generate(self, prompts: Any, s: GenerationSettings) -> list[list[int]]:
        prompts = token_id_lists(prompts)
        if not prompts:
            return []
        self._check(prompts, s)
        new: list[list[int]] = [[] for _ in prompts]
        for step in self._steps(prompts, s):
            for row in step.active.nonzero().flatten().tolist():
                new[row].append(int(step.tokens[row]))
        return new

    def _steps(
        self, prompts: Sequence[Sequence[int]], s: GenerationSettings
    ) -> Iterator[GenerationStep]:
        """Prefill the left-padded batch once, then decode one token per step.

        The caller has checked the prompts. The cache holds the longest prompt plus
        ``max_new_tokens``; a sequence that is done keeps being fed padding (its results
        are dropped) until every sequence is done.
        """
        model = self.model
        width = max(len(p) for p in prompts)
        processors = self.logits_processors(s, self.prompt_length(width))
        criteria = self.stopping_criteria(s)
        if is_encoder_decoder(model):  # the source encoded once, then the decoder's loop
            decode = self.decode if self.tokenizer is not None else None
            steps = seq2seq_steps(
                model,
                prompts,
                s,
                processors=processors,
                criteria=criteria,
                pad_id=self.pad_id,
                decode=decode,
                start=self._start,
                step=self._step,
                steady=self._steady,
                step_mask=self.compiled,
                graphs=self.cuda_graphs,
            )
            if self.cuda_graphs:
                self._warn_if_unrecorded(model.device)
            yield from (GenerationStep(*step) for step in steps)
            return
        if not self.cuda_graphs:
            yield from self._causal_steps(prompts, s, processors, criteria, None)
            return
        total = width + s.max_new_tokens
        with self._recorded.borrow(len(prompts), total) as graph:
            self._warn_if_unrecorded(graph.mask.device)
            yield from self._causal_steps(prompts, s, processors, criteria, graph)

    def _causal_steps(
        self,
        prompts: Sequence[Sequence[int]],
        s: GenerationSettings,
        processors: Sequence[LogitsProcessor],
        criteria: Sequence[StoppingCriterion],
        graph: DecodingGraph | None,
    ) -> Iterator[GenerationStep]:
        """A causal LM's loop; with ``graph``, the steps after the prompt are its fixed-shape
        (recorded) ones, and its cache and mask are the call's."""
        model, forward = self.model, self._forward
        device = model.device
        pad = self.pad_id
        batch, width = len(prompts), max(len(p) for p in prompts)
        total = width + s.max_new_tokens
        ids = torch.full((batch, total), pad, dtype=torch.long)
        mask = torch.zeros((batch, total), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt) : width] = torch.tensor(prompt, dtype=torch.long)
            mask[row, width - len(prompt) : width] = 1
        ids, mask = ids.to(device), mask.to(device)
        if graph is not None:  # the recorded step's own mask (and cache), which it reads
            graph.mask[:, :total] = mask
            mask = graph.mask
        rng = None
        seed = s.seed
        parallel = getattr(getattr(model, "record", None), "parallel", None)
        if s.sampling and seed is None and parallel is not None:
            seed = parallel.common_seed()  # tensor-parallel ranks must sample alike
        if s.sampling and seed is not None:
            rng = torch.Generator(device=device).manual_seed(seed)
        decode = self.decode if self.tokenizer is not None else None
        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        cache = graph.cache if graph is not None else model.new_cache(batch, total)
        with torch.inference_mode():
            out = forward(ids[:, :width], mask[:, :width], cache=cache, last_only=True)
        logits = out.logits[:, -1]
        for step in range(s.max_new_tokens):
            length = width + step
            active = ~finished
            token = next_tokens(
                logits,
                ids[:, :length],
                mask[:, :length],
                processors,
                s.sampling,
                rng,
                finished,
                pad,
            )
            ids[:, length] = token
            mask[:, length] = 1
            state = GenerationState(ids[:, : length + 1], width, finished, decode)
            done = torch.zeros_like(finished)
            for criterion in criteria:
                done |= criterion(state).to(device=device, dtype=torch.bool)
            finished = finished | done
            if graph is not None:
                launch = step + 1 < s.max_new_tokens
                logits, read = launch_then_read(graph, token, active, finished, length, launch)
                yield GenerationStep(*read)
                if bool(read[2].all()):
                    return
                continue
            yield GenerationStep(token, active, finished)
            if bool(finished.all()):
                return
            with torch.inference_mode(), self._steady(after_first_step=step > 0):
                out = forward(token[:, None], mask[:, : length + 1], cache=cache, last_only=True)
            logits = out.logits[:, -1]


def _id_list(value: Any) -> list[int]:
    """An id or a list of ids (as a config holds them) as a list of ints."""
    return [int(value)] if isinstance(value, int) else [int(v) for v in value]


def token_id_lists(prompts: Any) -> list[list[int]]:
    """Prompts as lists of Python ints: from lists, tuples, numpy arrays or tensors of
    integers (numpy and torch integers included). Anything else is an InputError."""
    if hasattr(prompts, "tolist") and hasattr(prompts, "dtype"):
        prompts = prompts.tolist()  # a tensor or an array: its elements become Python numbers
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Iterable):
        raise InputError(
            f"input_ids must be a list of prompts, each a list of token ids; found "
            f"{type(prompts).__name__}"
        )
    lists = []
    for i, prompt in enumerate(prompts):
        if hasattr(prompt, "tolist") and hasattr(prompt, "dtype"):
            prompt = prompt.tolist()
        if isinstance(prompt, (str, bytes)) or not isinstance(prompt, Iterable):
            raise InputError(
                f"prompt {i} must be a list of token ids; found {type(prompt).__name__} "
                "(a single prompt is [ids])"
            )
        ids = []
        for t in prompt:
            if isinstance(t, bool) or type(t).__name__ == "bool_" or not hasattr(t, "__index__"):
                raise InputError(
                    f"prompt {i} has a token id that is not an integer: {t!r} ({type(t).__name__})"
                )
            ids.append(operator.index(t))
        lists.append(ids)
    return lists


def compile_for_generation(model: Any) -> Any:
    """``model`` (a module, or a function of one) under ``torch.compile``: one whole
    graph, shapes dynamic (no recompiling per length or batch size). The shape checks the
    compiler inserts after every library call are left out: a decoding step is short
    enough that they would count."""
    return torch.compile(
        model,
        fullgraph=True,
        dynamic=True,
        options={"size_asserts": False, "alignment_asserts": False},
    )


def tokenizer_eos_ids(tokenizer: Any) -> list[int]:
    """The end-of-sequence id a tokenizer declares (tokenizer_config.json or
    special_tokens_map.json beside its tokenizer.json), or none."""
    if tokenizer is None:
        return []
    declared = getattr(tokenizer, "eos_token_id", None)
    if isinstance(declared, int):
        return [declared]
    source, inner = getattr(tokenizer, "source", None), getattr(tokenizer, "tokenizer", None)
    if source is None or inner is None:
        return []
    from ..tokenizers.hf_tokenizer import _read_json, _token_text

    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        token = _token_text(_read_json(source / name).get("eos_token"))
        if token is not None and inner.token_to_id(token) is not None:
            return [int(inner.token_to_id(token))]
    return []
