"""Mixture-of-experts models built from dense ones, as `mergekit-moe` (mergekit 0.1.5) builds them.

A config names a base model (attention, norms, embeddings and the output head come from it) and
experts, each a dense model of the base's shapes whose MLP becomes one expert of every layer::

    base_model: ./base
    gate_mode: hidden          # hidden | cheap_embed | random (also hidden_avg, hidden_last, uniform_random)
    dtype: bfloat16            # output dtype (default: the base model's)
    experts_per_token: 2
    experts:
      - source_model: ./code
        positive_prompts: ["def fibonacci(n):"]
        negative_prompts: ["Once upon a time"]   # optional
      - source_model: ./stories
        positive_prompts: ["Once upon a time"]
    shared_experts:            # Qwen2-MoE output only: exactly one, with prompts unless gate_mode: random
      - source_model: ./base
        positive_prompts: ["Hello"]

The output is what mergekit-moe writes for the same config:

- Llama or Mistral sources, no shared experts: a ``MixtralForCausalLM``; expert ``e`` of layer
  ``l`` is ``model.layers.l.block_sparse_moe.experts.e.{w1,w2,w3}.weight`` (the gate, down and up
  projections of that expert's source), the router ``model.layers.l.block_sparse_moe.gate.weight``
  (one gate vector per expert). These are Mixtral's checkpoint names (transformers 4 reads them as
  they are, transformers 5 fuses them on load, as do llama.cpp and vLLM); mergekit 0.1.5 writes
  transformers 5's fused ``mlp.experts.gate_up_proj`` instead, which cannot be streamed expert by
  expert.
- one shared expert (Qwen2, Llama or Mistral sources): a ``Qwen2MoeForCausalLM``, experts as
  ``mlp.experts.e.{gate,up,down}_proj``, the shared expert as ``mlp.shared_expert.*`` with its own
  gate vector as ``mlp.shared_expert_gate.weight``; attention biases a Llama base lacks are zeros.
  Qwen2 sources need the shared expert: mergekit-moe's Mixtral output takes no Qwen2 models.

Gate vectors (mergekit's ``get_gate_params``), per expert and layer, from the base model and its
tokenizer (left padding with the BOS token, each prompt prefixed with the BOS text):

- ``hidden`` / ``hidden_last``: the hidden state entering each layer (the embeddings, then each
  layer's output but the last) at each prompt's last position, averaged over the prompts;
  ``hidden_avg``: averaged over every position (padding included) instead of the last. The base
  model runs in bfloat16, as mergekit loads it (``--gate-dtype`` changes that);
- ``cheap_embed``: the token embeddings of the prompts (BOS included, padding not) summed and
  L2-normalised, the same vector for every layer;
- then the negative prompts' vector is subtracted and the difference L2-normalised (norm clamped
  at 1e-8);
- ``random``: standard normal; ``uniform_random``: uniform in +-sqrt(1/hidden_size), both drawn
  from a generator seeded with ``seed`` (what ``mergekit-moe --random-seed SEED`` draws).

Everything is checked before any work: the fields (``file:line: field: problem``), mergekit's own
rules (prompts for prompt-based gates, experts_per_token, identical prompts, identical experts),
every model's files and headers, that all models share an architecture and the base's shapes,
and that the experts' tokenizers have the base's vocabulary.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NoReturn

import yaml

from workbench.errors import WorkbenchError
from workbench.merge.tokenizer import copy_tokenizer_files, has_tokenizer, tokenizer_fingerprint, vocab_difference
from workbench.schema import Field, Reader, field_location, parse_with_lines

GATE_MODES = ("hidden", "cheap_embed", "random", "hidden_avg", "hidden_last", "uniform_random")
PROMPT_MODES = ("hidden", "hidden_avg", "hidden_last", "cheap_embed")
RANDOM_MODES = ("random", "uniform_random")
DTYPES = ("float32", "float16", "bfloat16")
SOURCE_TYPES = ("llama", "mistral", "qwen2")
MLP = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}   # dense name -> Mixtral expert name
ATTN_BIAS = ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias")
LAYER_TENSORS = ("input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight",
                 "self_attn.v_proj.weight", "self_attn.o_proj.weight", "post_attention_layernorm.weight")
LAYER_NAME = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
OUTPUTS = {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM"}


class MoeConfigError(WorkbenchError, ValueError):
    """A mixture-of-experts config (or its models) that does not validate."""


# --- the config ------------------------------------------------------------------------------

@dataclass
class Expert:
    source_model: str
    positive_prompts: list[str] | None = None
    negative_prompts: list[str] | None = None
    noise_scale: float | None = None
    residual_scale: float | None = None


@dataclass
class MoeConfig:
    base_model: str
    experts: list[Expert]
    gate_mode: str = "hidden"
    dtype: str | None = None
    experts_per_token: int = 2
    shared_experts: list[Expert] | None = None
    architecture: str | None = None
    source: str = "<config>"
    lines: dict = field(default_factory=dict, repr=False)

    def where(self, path: tuple) -> str:
        return field_location(self.source, self.lines, path)

    def fail(self, path: tuple, msg: str) -> NoReturn:
        raise MoeConfigError(f"{self.where(path)}: {'.'.join(map(str, path)) or 'config'}: {msg}")

    @property
    def relative_to(self) -> Path | None:
        return None if self.source.startswith("<") else Path(self.source).parent

    def to_dict(self, paths: dict[str, str] | None = None) -> dict:
        """The config as mergekit-moe reads it; ``paths`` maps model references to what to write."""
        paths = paths or {}

        def expert(e: Expert) -> dict:
            d = {"source_model": paths.get(e.source_model, e.source_model)}
            for k in ("positive_prompts", "negative_prompts", "noise_scale", "residual_scale"):
                if getattr(e, k) is not None:
                    d[k] = getattr(e, k)
            return d

        d: dict[str, Any] = {"base_model": paths.get(self.base_model, self.base_model), "gate_mode": self.gate_mode}
        if self.architecture:
            d["architecture"] = self.architecture
        if self.dtype:
            d["dtype"] = self.dtype
        d["experts_per_token"] = self.experts_per_token
        d["experts"] = [expert(e) for e in self.experts]
        if self.shared_experts is not None:
            d["shared_experts"] = [expert(e) for e in self.shared_experts]
        return d


def _model_ref(value: Any, path: tuple, fail) -> str:
    if isinstance(value, dict):   # mergekit's {model: {path: ...}} / {model: ...} form
        if value.get("lora"):
            fail(path, "a model with a LoRA adapter is not supported here; merge the adapter first")
        value = value.get("model")
        value = value.get("path") if isinstance(value, dict) else value
    if not isinstance(value, str) or not value:
        fail(path, "expected a model path or name")
    if "+" in value and not Path(value).expanduser().exists():
        fail(path, f"{value!r}: a model with a LoRA adapter (MODEL+LORA) is not supported here; merge the "
                   "adapter first")
    return value


def _dtype(v: str, path: tuple, fail) -> str:
    name = v[len("torch."):] if v.startswith("torch.") else v
    if name not in DTYPES:
        fail(path, f"{v!r} is not a dtype; expected one of {', '.join(DTYPES)}")
    return name


PROMPTS = Field(list, None, item=Field(str, msg="expected a prompt string"),
                msg="expected a list of prompt strings")
EXPERT = Field(dict, msg="expected a mapping with source_model (and positive_prompts, negative_prompts)", fields={
    "source_model": Field(object, check=_model_ref, msg="expected a model path or name"),
    "positive_prompts": PROMPTS,
    "negative_prompts": PROMPTS,
    "noise_scale": Field(float, None, low=0),
    "residual_scale": Field(float, None),
}, make=lambda **kw: Expert(**kw))
CONFIG = Field(dict, msg="expected a mapping with base_model and experts", fields={
    "base_model": Field(object, check=_model_ref, msg="expected a model path or name"),
    "experts": Field(list, nonempty=True, item=EXPERT, msg="expected a non-empty list of {source_model, "
                                                           "positive_prompts}"),
    "gate_mode": Field(str, "hidden", choices=GATE_MODES,
                       msg=lambda v: f"expected one of {', '.join(GATE_MODES)}, got {v!r}"),
    "dtype": Field(str, None, check=_dtype),
    "experts_per_token": Field(int, 2, low=1),
    "shared_experts": Field(list, None, item=EXPERT, msg="expected a list of {source_model, positive_prompts}"),
    "architecture": Field(str, None),
})


def load_moe_config(path: str | Path) -> MoeConfig:
    path = Path(path).expanduser()
    if not path.is_file():
        raise MoeConfigError(f"{path}: no such config file" if not path.exists() else f"{path}: not a file")
    data, lines = parse_with_lines(path.read_text(), str(path), MoeConfigError)
    return moe_config_from_dict(data, str(path), lines)


def parse_moe_config(text: str, source: str = "<config>") -> MoeConfig:
    data, lines = parse_with_lines(text, source, MoeConfigError)
    return moe_config_from_dict(data, source, lines)


def moe_config_from_dict(data: Any, source: str = "<config>", lines: dict | None = None) -> MoeConfig:
    """Check every field, then mergekit-moe's rules (``is_bad_config``, the shared experts' prompts)."""
    r = Reader(source, lines, MoeConfigError, root="config")
    v = r.check(data, CONFIG)
    cfg = MoeConfig(**v, source=source, lines=r.lines)
    if cfg.experts_per_token > len(cfg.experts):
        n = len(cfg.experts)
        cfg.fail(("experts_per_token",) if ("experts_per_token",) in cfg.lines else ("experts",),
                 f"{cfg.experts_per_token} experts per token (the default is 2), but only {n} "
                 f"expert{'s' if n > 1 else ''}")
    if cfg.gate_mode in PROMPT_MODES:
        for i, e in enumerate(cfg.experts):
            if not e.positive_prompts:
                cfg.fail(("experts", i), f"gate_mode {cfg.gate_mode} needs positive_prompts for every expert "
                                         "(what should be routed to it), or use gate_mode: random")

        def prompts(e: Expert) -> tuple:
            return tuple(e.positive_prompts), tuple(e.negative_prompts or ())

        if len(cfg.experts) > 1 and all(prompts(e) == prompts(cfg.experts[0]) for e in cfg.experts[1:]):
            cfg.fail(("experts",), "every expert has the same positive and negative prompts; the router could "
                                   "not tell them apart. Give each expert prompts of what should go to it")
    shared = cfg.shared_experts or []
    if shared and len({bool(e.positive_prompts) for e in shared}) > 1:
        cfg.fail(("shared_experts",), "give positive_prompts to every shared expert or to none")
    return cfg


# --- the plan: every model opened and checked, every output tensor named ----------------------

@dataclass
class Job:
    """One output tensor: copied from ``model``'s ``tensor`` (through ``expert``'s noise and
    residual scale), zeros, or router gate vectors (``router``: "experts" or "shared")."""
    name: str
    shape: tuple[int, ...]
    model: Path | None = None
    tensor: str | None = None
    expert: Expert | None = None
    residual: bool = False
    layer: int | None = None
    router: str | None = None


@dataclass
class MoePlan:
    config: MoeConfig
    output: str                       # "mixtral" or "qwen2_moe"
    paths: dict[str, Path]            # model reference -> directory
    models: dict[Path, Any]           # directory -> ModelDir
    hf_config: Any                    # the output's transformers config
    dtype: Any                        # output torch dtype
    jobs: list[Job]
    num_layers: int
    hidden_size: int
    gate_experts: list[Expert]        # the experts gate vectors are computed for, in order
    tokenizer_dir: Path

    @property
    def base(self):
        return self.models[self.paths[self.config.base_model]]

    @property
    def architecture(self) -> str:
        return OUTPUTS[self.output]

    def close(self) -> None:
        for m in self.models.values():
            m.close()


def _architecture(cfg: MoeConfig, model_types: list[str]) -> str:
    """The output mergekit-moe's ``select_output_arch`` picks: "mixtral" or "qwen2_moe", or fail."""
    shared = cfg.shared_experts or []
    same = len(set(model_types)) == 1
    kind = model_types[0]

    def mixtral():
        if shared:
            return "takes no shared experts"
        return None if same and kind in ("llama", "mistral") else "takes only Llama or Mistral models"

    def deepseek():
        if len(shared) > 1:
            return "takes at most one shared expert"
        if shared and (shared[0].positive_prompts or shared[0].negative_prompts):
            return "takes no prompts for a shared expert"
        return None if same and kind in ("llama", "mistral") else "takes only Llama or Mistral models"

    def qwen():
        if len(shared) != 1:
            return "needs exactly one shared expert (shared_experts)"
        if cfg.gate_mode != "random" and not shared[0].positive_prompts:
            return f"needs positive_prompts for the shared expert with gate_mode {cfg.gate_mode}"
        return None if same and kind in SOURCE_TYPES else "takes only Qwen2, Llama or Mistral models"

    def qwen3():
        if shared:
            return "takes no shared experts"
        return None if all(t == "qwen3" for t in model_types) else "takes only Qwen3 models"

    archs = [("Mixtral", mixtral, "mixtral"), ("DeepSeek MoE", deepseek, None), ("Qwen MoE", qwen, "qwen2_moe"),
             ("Qwen3 MoE", qwen3, None)]
    if cfg.architecture:
        archs = [a for a in archs if a[0].lower().startswith(cfg.architecture.lower())]
        if not archs:
            cfg.fail(("architecture",), f"no output architecture {cfg.architecture!r}; mergekit-moe's are "
                                        "mixtral, deepseek, qwen (Qwen2-MoE) and qwen3")
    if not same:
        cfg.fail(("experts",), f"every model must have the same architecture; got model types "
                               f"{', '.join(sorted(set(model_types)))}")
    reasons = {name: test() for name, test, _ in archs}
    ok = [a for a in archs if reasons[a[0]] is None]
    if not ok:
        why = "; ".join(f"{name} {reason}" for name, reason in reasons.items())
        cfg.fail(("shared_experts",) if kind == "qwen2" and not shared else (),
                 f"no MoE output architecture takes these {kind} models: {why}")
    name, _, output = next((a for a in ok if a[0] == "Mixtral"), ok[0])
    if output is None:
        hint = ("; give the shared expert positive_prompts for a Qwen2-MoE model" if name.startswith("DeepSeek")
                else "")
        cfg.fail(("shared_experts",) if shared else (),
                 f"mergekit-moe would write a {name} model here, which workbench moe does not write "
                 f"(it writes Mixtral and Qwen2-MoE){hint}")
    return output


def _resolve(cfg: MoeConfig, ref: str, path: tuple) -> Path:
    from workbench.models.loader import resolve_model

    try:
        p = resolve_model(ref, cfg.relative_to)
    except WorkbenchError as e:
        cfg.fail(path, str(e))
    if p.is_file():
        cfg.fail(path, f"{p}: a GGUF file; import it first (`workbench models import-gguf`)")
    return p.resolve()


def load_tokenizer(path: Path):
    """The base model's tokenizer set up as mergekit-moe does for the prompts: padding on the left
    with the BOS token (the EOS token when there is no BOS)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    tok.padding_side = "left"
    tok.pad_token_id = tok.bos_token_id
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def plan_moe(cfg: MoeConfig, allow_all_same: bool = False) -> MoePlan:
    """Open every model (headers checked), pick the output architecture as mergekit-moe does, and
    check the shapes, tensors and tokenizers; nothing is computed yet."""
    import torch

    from workbench.models.checkpoint import ModelDir

    shared = cfg.shared_experts or []
    refs: list[tuple[str, tuple]] = [(cfg.base_model, ("base_model",))]
    refs += [(e.source_model, ("experts", i, "source_model")) for i, e in enumerate(cfg.experts)]
    refs += [(e.source_model, ("shared_experts", i, "source_model")) for i, e in enumerate(shared)]
    paths: dict[str, Path] = {}
    where: dict[Path, tuple] = {}
    models: dict[Path, ModelDir] = {}
    try:
        for ref, path in refs:
            if ref not in paths:
                paths[ref] = _resolve(cfg, ref, path)
            p = paths[ref]
            where.setdefault(p, path)
            if p not in models:
                try:
                    models[p] = ModelDir(p)
                except WorkbenchError as e:
                    cfg.fail(path, str(e))
        types = [models[paths[ref]].config.get("model_type", "unknown") for ref, _ in refs]
        for (ref, path), t in zip(refs, types):
            if t != types[0]:
                cfg.fail(path, f"{paths[ref]}: a {t} model, the base model is {types[0]}; every model must have "
                               "the same architecture")
        output = _architecture(cfg, types)
        if (cfg.gate_mode not in RANDOM_MODES and not allow_all_same and len(cfg.experts) > 1
                and len({paths[e.source_model] for e in cfg.experts}) == 1):
            cfg.fail(("experts",), "every expert is the same model: the MoE would only be bigger and slower than "
                                   "it; pass --i-understand-this-is-not-useful-without-training to build it "
                                   "anyway (to train it after)")
        plan = _plan_tensors(cfg, output, paths, models, where)
        plan.dtype = _output_dtype(cfg, plan.base, torch)
        plan.hf_config = _output_config(plan)
    except BaseException:
        for m in models.values():
            m.close()
        raise
    return plan


def _plan_tensors(cfg: MoeConfig, output: str, paths: dict[str, Path], models: dict, where: dict) -> MoePlan:
    base_path = paths[cfg.base_model]
    base = models[base_path]
    bc = base.config
    L = base.num_layers
    hidden = int(bc.get("hidden_size", 0))
    tied = bool(bc.get("tie_word_embeddings", False))
    shared = cfg.shared_experts or []
    out_name = OUTPUTS[output]

    def fail_base(msg: str) -> NoReturn:
        cfg.fail(("base_model",), f"{base_path}: {msg}")

    # the base: every tensor has a place in the output, and the ones the output needs are there
    per_layer: dict[int, list[str]] = {i: [] for i in range(L)}
    top: list[str] = []
    for name in base.tensor_names():
        if name.endswith("rotary_emb.inv_freq"):
            continue
        m = LAYER_NAME.match(name)
        if m is None:
            if name not in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
                fail_base(f"tensor {name!r} has no place in a {out_name} model (workbench moe reads the "
                          "Llama, Mistral and Qwen2 layouts)")
            top.append(name)
            continue
        layer, rest = int(m.group(1)), m.group(2)
        if layer >= L:
            fail_base(f"tensor {name!r} is past the {L} layers its config.json gives")
        if rest in tuple(f"mlp.{p}.weight" for p in MLP):
            continue
        if rest not in LAYER_TENSORS and not (output == "qwen2_moe" and rest in ATTN_BIAS):
            fail_base(f"tensor {name!r} has no place in a {out_name} model (it has no "
                      f"{'MLP' if 'mlp' in rest else 'attention'} biases)")
        per_layer[layer].append(name)
    needed = ["model.embed_tokens.weight", "model.norm.weight"] + ([] if tied else ["lm_head.weight"])
    needed += [f"model.layers.{i}.{t}" for i in range(L) for t in LAYER_TENSORS]
    needed += [f"model.layers.{i}.mlp.{p}.weight" for i in range(L) for p in MLP]
    missing = [n for n in needed if n not in base]
    if missing:
        fail_base(f"tensor {missing[0]!r} is missing" + (f" (and {len(missing) - 1} more)" if len(missing) > 1
                                                         else ""))
    if base.shape("model.embed_tokens.weight")[1] != hidden:
        fail_base(f"model.embed_tokens.weight has shape {list(base.shape('model.embed_tokens.weight'))}, "
                  f"but hidden_size is {hidden}")
    if output == "qwen2_moe":
        heads = int(bc.get("num_attention_heads", 0))
        if not heads or hidden % heads or base.shape("model.layers.0.self_attn.q_proj.weight")[0] != hidden:
            fail_base(f"attention heads of {hidden // max(heads, 1)} = hidden_size / num_attention_heads "
                      "values are needed for a Qwen2-MoE model (it has no head_dim); this model's differ")
    mlp_shape = {p: base.shape(f"model.layers.0.mlp.{p}.weight") for p in MLP}

    # the experts: the base's layer count and MLP shapes (one intermediate_size for every expert)
    sources = [(e, ("experts", i, "source_model")) for i, e in enumerate(cfg.experts)]
    sources += [(e, ("shared_experts", i, "source_model")) for i, e in enumerate(shared)]
    checked: set[Path] = set()
    for e, path in sources:
        p = paths[e.source_model]
        if p in checked:
            continue
        checked.add(p)
        m = models[p]
        if m.num_layers != L:
            cfg.fail(path, f"{p}: {m.num_layers} layers, the base model has {L}")
        if int(m.config.get("hidden_size", 0)) != hidden:
            cfg.fail(path, f"{p}: hidden_size {m.config.get('hidden_size')}, the base model's is {hidden}")
        for i in range(L):
            for proj in MLP:
                name = f"model.layers.{i}.mlp.{proj}.weight"
                if name not in m:
                    cfg.fail(path, f"{p}: tensor {name!r} is missing")
                want = base.shape(name)
                if m.shape(name) != want:
                    cfg.fail(path, f"{p}: tensor {name!r} has shape {list(m.shape(name))}, the base model's is "
                                   f"{list(want)} (every expert needs the base model's shapes)")
                if want != mlp_shape[proj]:
                    fail_base(f"tensor {name!r} has shape {list(want)}, layer 0's is {list(mlp_shape[proj])} "
                              "(an MoE has one intermediate size)")

    # the tokenizer the gates are computed with and the output gets: the base's
    if not has_tokenizer(base_path):
        fail_base("no tokenizer (tokenizer.json, tokenizer.model or vocab.json); the output needs one and the "
                  "gate prompts are tokenized with it")
    _check_tokenizers(cfg, paths, where, base_path)

    jobs: list[Job] = []
    for name in top:
        if name == "model.embed_tokens.weight":
            jobs.append(Job(name, base.shape(name), base_path, name))
    E = len(cfg.experts)
    for i in range(L):
        for name in sorted(per_layer[i]):
            jobs.append(Job(name, base.shape(name), base_path, name))
        if output == "mixtral":
            prefix = f"model.layers.{i}.block_sparse_moe"
            for j, e in enumerate(cfg.experts):
                for proj, w in MLP.items():
                    src = f"model.layers.{i}.mlp.{proj}.weight"
                    jobs.append(Job(f"{prefix}.experts.{j}.{w}.weight", mlp_shape[proj], paths[e.source_model], src,
                                    e, proj == "down_proj"))
            jobs.append(Job(f"{prefix}.gate.weight", (E, hidden), layer=i, router="experts"))
        else:
            prefix = f"model.layers.{i}"
            for b in ATTN_BIAS:
                name = f"{prefix}.{b}"
                if name not in base:   # Qwen2-MoE has q/k/v biases; a Llama base gets zeros (as mergekit)
                    rows = base.shape(f"{prefix}.{b[:-len('bias')]}weight")[0]
                    jobs.append(Job(name, (rows,)))
            for j, e in enumerate(cfg.experts):
                for proj in ("gate_proj", "up_proj", "down_proj"):
                    src = f"{prefix}.mlp.{proj}.weight"
                    jobs.append(Job(f"{prefix}.mlp.experts.{j}.{proj}.weight", mlp_shape[proj],
                                    paths[e.source_model], src, e, proj == "down_proj"))
            s = shared[0]
            for proj in ("gate_proj", "up_proj", "down_proj"):
                src = f"{prefix}.mlp.{proj}.weight"
                jobs.append(Job(f"{prefix}.mlp.shared_expert.{proj}.weight", mlp_shape[proj],
                                paths[s.source_model], src, s, proj == "down_proj"))
            jobs.append(Job(f"{prefix}.mlp.gate.weight", (E, hidden), layer=i, router="experts"))
            jobs.append(Job(f"{prefix}.mlp.shared_expert_gate.weight", (1, hidden), layer=i, router="shared"))
    for name in top:
        if name != "model.embed_tokens.weight":
            jobs.append(Job(name, base.shape(name), base_path, name))

    gate_experts = list(cfg.experts)
    if shared and (any(e.positive_prompts for e in shared) or cfg.gate_mode in RANDOM_MODES):
        gate_experts += shared
    return MoePlan(cfg, output, paths, models, None, None, jobs, L, hidden, gate_experts, base_path)


def _check_tokenizers(cfg: MoeConfig, paths: dict[str, Path], where: dict, base_path: Path) -> None:
    """Each expert with a tokenizer of its own must have the base's vocabulary (the output and its
    router use the base's tokenizer)."""
    base_print = tokenizer_fingerprint(base_path)
    others = [p for p in dict.fromkeys(paths.values())
              if p != base_path and has_tokenizer(p) and tokenizer_fingerprint(p) != base_print]
    if not others:
        return
    from transformers import AutoTokenizer

    try:
        base_vocab = AutoTokenizer.from_pretrained(str(base_path)).get_vocab()
    except Exception as e:  # noqa: BLE001 - whatever transformers raises for a broken tokenizer
        cfg.fail(("base_model",), f"{base_path}: cannot load its tokenizer ({type(e).__name__}: {e})".split("\n")[0])
    for p in others:
        try:
            vocab = AutoTokenizer.from_pretrained(str(p)).get_vocab()
        except Exception as e:  # noqa: BLE001
            cfg.fail(where[p], f"{p}: cannot load its tokenizer ({type(e).__name__}: {e})".split("\n")[0])
        diff = vocab_difference(vocab, base_vocab)
        if diff is not None:
            cfg.fail(where[p], f"{p}: its tokenizer's vocabulary differs from the base model's ({len(vocab)} vs "
                               f"{len(base_vocab)} tokens; {diff!r} is {vocab.get(diff)} here, "
                               f"{base_vocab.get(diff)} in the base); the MoE reads text with the base's tokenizer")


def _output_dtype(cfg: MoeConfig, base, torch):
    """mergekit's ``select_dtype``: the config's dtype, else the base config's, else its embeddings'."""
    name = cfg.dtype or base.config.get("dtype") or base.config.get("torch_dtype")
    if isinstance(name, str) and name.startswith("torch."):
        name = name[len("torch."):]
    if name in DTYPES:
        return getattr(torch, name)
    return base.dtype("model.embed_tokens.weight")


def _output_config(plan: MoePlan):
    """The output's transformers config, made as mergekit-moe makes it (its ``_generate_config``)."""
    import transformers

    cfg = plan.config
    try:
        base_cfg = transformers.AutoConfig.from_pretrained(str(plan.paths[cfg.base_model]))
    except Exception as e:  # noqa: BLE001
        why = str(e).split("\n")[0]
        raise WorkbenchError(f"{plan.paths[cfg.base_model]}/config.json: transformers cannot read it ({why})") from None
    k = plan.config.experts_per_token
    if plan.output == "mixtral":
        if not isinstance(base_cfg, transformers.MistralConfig):
            m = transformers.MistralConfig(**base_cfg.to_dict())
            m.sliding_window = None
            m.max_position_embeddings = base_cfg.max_position_embeddings
            base_cfg = m
        out = transformers.MixtralConfig(**base_cfg.to_dict())
        out.architectures = ["MixtralForCausalLM"]
        out.num_local_experts = len(cfg.experts)
        out.num_experts_per_tok = k
        out.sliding_window = None
    else:
        out = transformers.Qwen2MoeConfig(**base_cfg.to_dict())
        out.architectures = ["Qwen2MoeForCausalLM"]
        out.num_experts = len(cfg.experts)
        out.num_experts_per_tok = k
        out.decoder_sparse_step = 1
        out.norm_topk_prob = True
        out.sliding_window = None
        out.use_sliding_window = False
        out.shared_expert_intermediate_size = out.intermediate_size
        out.moe_intermediate_size = out.intermediate_size
    out.dtype = plan.dtype
    return out


# --- gate vectors ------------------------------------------------------------------------------

def tokenize_prompts(prompts: list[str], tokenizer):
    """mergekit's ``tokenize_prompts``: the BOS text before each prompt, no other special tokens."""
    return tokenizer([(tokenizer.bos_token or "") + p for p in prompts], return_tensors="pt", padding=True,
                     add_special_tokens=False)


def hidden_vectors(model, batch, mode: str):
    """(num_layers, hidden): the hidden states entering each layer, at the last position
    (``hidden``, ``hidden_last``) or averaged over every position (``hidden_avg``), averaged over
    the prompts: mergekit's ``get_hidden_states``, in the model's dtype."""
    import torch

    with torch.no_grad():
        out = model(input_ids=batch["input_ids"].to(model.device),
                    attention_mask=batch["attention_mask"].to(model.device),
                    output_hidden_states=True, return_dict=True)
    hs = torch.stack(out.hidden_states[:-1])   # (layers, prompts, positions, hidden)
    hs = hs.sum(dim=2) / hs.shape[2] if mode == "hidden_avg" else hs[:, :, -1, :]
    return hs.sum(dim=1) / hs.shape[1]


def cheap_vectors(embed, batch, num_layers: int):
    """(num_layers, hidden): mergekit's ``get_cheap_embedding``: the prompts' token embeddings
    (padding masked out) summed, L2-normalised, repeated for every layer. A row lookup equals its
    one-hot product exactly, without the (prompts, positions, vocabulary) one-hot tensor."""
    e = embed.float()[batch["input_ids"]]                       # (prompts, positions, hidden)
    summed = (e * batch["attention_mask"].unsqueeze(-1)).sum(dim=1).sum(dim=0, keepdim=True)
    res = summed / summed.norm(dim=-1, keepdim=True).clamp(min=1e-8)
    return res.repeat(num_layers, 1)


def compute_gates(plan: MoePlan, *, device: str = "cpu", gate_dtype: str = "bfloat16", seed: int = 0,
                  on_prompts: Callable[[int, int, str], None] | None = None):
    """(layers, gate experts, hidden) gate vectors, as mergekit's ``get_gate_params``;
    ``on_prompts(done, total, what)`` after each expert's prompt batch."""
    import torch

    cfg = plan.config
    shape = (plan.num_layers, len(plan.gate_experts), plan.hidden_size)
    if cfg.gate_mode == "random":
        return torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    if cfg.gate_mode == "uniform_random":
        scale = math.sqrt(1.0 / plan.hidden_size)
        return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 2 * scale - scale

    tokenizer = load_tokenizer(plan.tokenizer_dir)
    if tokenizer.pad_token_id is None:
        cfg.fail(("base_model",), f"{plan.tokenizer_dir}: its tokenizer has neither a BOS nor an EOS token to pad "
                                  "the prompts with")
    model = None
    if cfg.gate_mode == "cheap_embed":
        embed = plan.base.get_tensor("model.embed_tokens.weight")

        def vectors(batch):
            return cheap_vectors(embed, batch, plan.num_layers)
    else:
        from workbench.models.loader import load_model

        model, _ = load_model(plan.tokenizer_dir, gate_dtype)
        model.to(device)

        def vectors(batch):
            return hidden_vectors(model, batch, cfg.gate_mode)

    total = sum(len(e.positive_prompts or ()) + len(e.negative_prompts or ()) for e in plan.gate_experts)
    done = 0
    vecs = []
    n = len(cfg.experts)
    try:
        for i, e in enumerate(plan.gate_experts):
            label = f"expert {i}" if i < n else f"shared expert {i - n}"
            h = vectors(tokenize_prompts(e.positive_prompts, tokenizer))
            done += len(e.positive_prompts)
            if on_prompts:
                on_prompts(done, total, f"{label} positive")
            if e.negative_prompts:
                h -= vectors(tokenize_prompts(e.negative_prompts, tokenizer))
                done += len(e.negative_prompts)
                if on_prompts:
                    on_prompts(done, total, f"{label} negative")
            h /= h.norm(p=2, dim=-1, keepdim=True).clamp(min=1e-8)
            vecs.append(h.cpu())
    finally:
        del model
    return torch.stack(vecs, dim=0).permute(1, 0, 2)


def gate_warnings(gates, num_experts: int, threshold: float = 5.0) -> list[str]:
    """mergekit's warnings: layers whose gate vectors are near-degenerate (condition number over
    ``threshold``: prompts too alike), and an expert count that is no power of two (llama.cpp)."""
    import torch

    out = []
    bad = [i for i in range(gates.shape[0]) if float(torch.linalg.cond(gates[i].float())) > threshold]
    if bad:
        which = "every layer" if len(bad) == gates.shape[0] else "layers " + ", ".join(map(str, bad))
        out.append(f"{which}: near-degenerate router gate vectors (condition number over {threshold:g}); the "
                   "prompts may be too alike and some experts will be underused")
    if num_experts & (num_experts - 1):
        out.append(f"{num_experts} experts is not a power of two; llama.cpp will not run this model")
    return out


# --- writing ---------------------------------------------------------------------------------

def _noise_seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def job_tensor(plan: MoePlan, job: Job, gates, seed: int):
    """The output tensor of one job, in the output dtype."""
    import torch

    if job.router == "experts":
        t = gates[job.layer, : len(plan.config.experts), :]
    elif job.router == "shared":
        t = gates[job.layer, len(plan.config.experts):, :]
    elif job.model is None:
        t = torch.zeros(job.shape, dtype=plan.dtype)
    else:
        t = plan.models[job.model].get_tensor(job.tensor)
        e = job.expert
        if e is not None and e.noise_scale is not None:   # mergekit's noise_and_scale
            g = torch.Generator().manual_seed(_noise_seed(seed, job.name))
            t = t + torch.randn(t.shape, generator=g, dtype=t.dtype) * e.noise_scale
        if e is not None and job.residual and e.residual_scale is not None:
            t = t * e.residual_scale
    return t.to(plan.dtype).contiguous()


def write_moe(plan: MoePlan, gates, out_dir: str | Path, *, shard_size: int, seed: int = 0,
              overwrite: bool = False, on_tensor: Callable[[int, int, str], None] | None = None) -> tuple[int, int]:
    """Write the MoE model into ``out_dir`` atomically, tensor by tensor; (bytes, shards)."""
    from workbench.atomic import atomic_dir
    from workbench.merge.executor import close_shards, shard_layout
    from workbench.models.safetensors_io import StreamingShardWriter

    specs = [(j.name, plan.dtype, tuple(j.shape)) for j in plan.jobs]
    shards, names, shard_of = shard_layout(specs, shard_size)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        writers = [StreamingShardWriter(tmp / n, shard) for n, shard in zip(names, shards)]
        try:
            for i, job in enumerate(plan.jobs):
                writers[shard_of[job.name]].write(job.name, job_tensor(plan, job, gates, seed))
                if on_tensor:
                    on_tensor(i + 1, len(plan.jobs), job.name)
        except BaseException:
            for w in writers:
                w.abort()
            raise
        total = close_shards(writers, names, shard_of, [n for n, _, _ in specs], tmp)
        write_output_files(plan, tmp, seed, out_dir.name)
    return total, len(shards)


def config_yaml(plan: MoePlan, seed: int) -> str:
    """The config with every model by its absolute path (mergekit-moe reads it), the seed in a comment."""
    text = yaml.safe_dump(plan.config.to_dict({r: str(p) for r, p in plan.paths.items()}), sort_keys=False,
                          allow_unicode=True)
    notes = []
    if plan.config.gate_mode in RANDOM_MODES:
        notes.append(f"# gate vectors drawn with seed {seed} (workbench moe --seed {seed}; "
                     f"mergekit-moe --random-seed {seed} draws the same)\n")
    if any(e.noise_scale for e in plan.config.experts + (plan.config.shared_experts or [])):
        notes.append(f"# expert noise drawn with seed {seed}, per tensor\n")
    return "".join(notes) + text


def write_output_files(plan: MoePlan, out: Path, seed: int, title: str) -> None:
    """config.json, the generation config, the base's tokenizer, ``mergekit_moe_config.yml`` and a
    README.md model card."""
    plan.hf_config.save_pretrained(str(out))
    base_dir = plan.paths[plan.config.base_model]
    if (base_dir / "generation_config.json").is_file():
        shutil.copy2(base_dir / "generation_config.json", out / "generation_config.json")
    copy_tokenizer_files(plan.tokenizer_dir, out)
    text = config_yaml(plan, seed)
    (out / "mergekit_moe_config.yml").write_text(text)
    (out / "README.md").write_text(model_card(plan, text, seed, title))


def model_card(plan: MoePlan, config_text: str, seed: int, title: str) -> str:
    cfg = plan.config
    experts = "\n".join(f"- expert {i}: `{plan.paths[e.source_model]}`" for i, e in enumerate(cfg.experts))
    shared = "".join(f"\n- shared expert: `{plan.paths[e.source_model]}`" for e in cfg.shared_experts or [])
    gate = {"hidden": "the base model's hidden states of each expert's prompts (last position)",
            "hidden_last": "the base model's hidden states of each expert's prompts (last position)",
            "hidden_avg": "the base model's hidden states of each expert's prompts (every position)",
            "cheap_embed": "the token embeddings of each expert's prompts",
            "random": f"random (standard normal, seed {seed})",
            "uniform_random": f"random (uniform, seed {seed})"}[cfg.gate_mode]
    return f"""---
tags:
- moe
- merge
- workbench
---
# {title}

A mixture of experts ({plan.architecture}, {len(cfg.experts)} experts, {cfg.experts_per_token} per token) built
with [workbench](https://pypi.org/project/workbench/) `workbench moe`, as `mergekit-moe` builds it.
Attention, norms and embeddings come from the base model `{plan.paths[cfg.base_model]}`; each expert's
MLP from its model:

{experts}{shared}

Router gates: {gate}.

## Config
Also saved as `mergekit_moe_config.yml`, every model by the absolute path it was read from;
`workbench moe` and `mergekit-moe` both read it.

```yaml
{config_text.rstrip()}
```
"""
