"""LoRA (Hu et al., 2022) for reprlab encoders, through the ``peft`` library (``pip install 'reprlab[lora]'``).

peft fits our encoders as they are: ``inject_adapter_in_model`` wraps named ``nn.Linear`` / ``nn.Conv2d``
layers of any module in place, so the encoder keeps its type, spec, normalization and forward, and its LoRA
weights live in the module tree (the engine's state.pt and the best-epoch copy hold them; resume is exact).
:func:`merge_lora` folds ``scale * B A`` into each base weight and puts the plain layer back, so a saved
classifier or encoder has the original keys and loads without peft.

Default targets (:func:`default_targets`), per family: the attention input projections, as in the paper
(W_q, W_v): timm ViTs' fused ``qkv``, HF ViT / DeiT / DINOv2 / ViT-MAE ``query`` + ``value``, CLIP ``q_proj`` +
``v_proj``. A model without attention (a convnet) gets peft's conv LoRA on every ungrouped ``Conv2d`` and
every ``Linear``; at small widths that is a larger share of the parameters than on a ViT (a k x k kernel's A
is r x C_in x k x k).
"""

from __future__ import annotations

from torch import nn

from reprlab.config import ConfigError

ATTENTION_TARGETS = (("qkv",), ("query", "value"), ("q_proj", "v_proj"))
ADAPTABLE = (nn.Linear, nn.Conv2d)


def _peft():
    try:
        import peft
    except ImportError:
        raise ConfigError("policy 'lora' needs the peft library: pip install 'reprlab[lora]' (or pip install "
                          "peft)") from None
    return peft


def default_targets(model: nn.Module) -> list[str]:
    """Full names of the layers LoRA adapts by default (module docstring)."""
    linears = [(name, name.rsplit(".", 1)[-1]) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    for family in ATTENTION_TARGETS:
        found = [name for name, last in linears if last in family]
        if {last for _, last in linears if last in family} == set(family):
            return found
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1)]


def resolve_targets(model: nn.Module, target_modules: list[str] | None) -> list[str]:
    """Full names of the ``nn.Linear`` / ``nn.Conv2d`` layers matching ``target_modules`` (a full name or its
    last part, e.g. ``qkv``); None: :func:`default_targets`."""
    if target_modules is None:
        targets = default_targets(model)
    else:
        wanted = set(target_modules)
        targets = [name for name, m in model.named_modules() if isinstance(m, ADAPTABLE)
                   and (name in wanted or name.rsplit(".", 1)[-1] in wanted)]
    if not targets:
        names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, ADAPTABLE)})
        raise ConfigError(f"policy.params.target_modules={target_modules!r} matches no Linear or Conv2d layer of "
                          f"{type(model).__name__}; its layer names include {names[:12]}")
    return targets


def add_lora(model: nn.Module, rank: int, alpha: float, dropout: float, targets: list[str]) -> list[nn.Parameter]:
    """Wrap the ``targets`` layers of ``model`` in place with LoRA (B initialized at zero: the function is
    unchanged at step 0); returns the new LoRA parameters."""
    peft = _peft()
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none")
    peft.inject_adapter_in_model(config, model)
    return [p for name, p in model.named_parameters() if ".lora_" in name]


def merge_lora(model: nn.Module) -> int:
    """Fold every LoRA layer of ``model`` into its base layer and put the base layer back (so the state dict
    has the original keys again); returns how many were merged. A model without LoRA is left alone."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # no peft, hence no LoRA layers
        return 0
    merged = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge(safe_merge=True)  # safe_merge: refuse to write NaN or inf weights
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, module.get_base_layer())
            merged += 1
    if hasattr(model, "peft_config"):  # peft's bookkeeping on the injected model
        del model.peft_config
    return merged
