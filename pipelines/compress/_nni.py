"""The one place that imports NNI (3.0). Everything NNI-specific, including its quirks, lives here.

Quirks handled (torch 2.14/2.15; ../shared/NOTES-nni.md):
- ModelSpeedup's own tracer crashes: we pass ``graph_module=torch.fx.symbolic_trace(model)``.
- Residual-coupled convs must be pruned together: ``auto_set_denpendency_group_ids`` (NNI's spelling).
- NNI prints coloured logs, resets its logger to INFO in speedup and has a bare print: silenced.
- QAT leaves scales ``None`` when training ends before ``quant_start_step``: checked, not assumed.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import warnings
from collections.abc import Callable, Iterator

import torch
from torch import nn

from pipelines.errors import CompressionError

__all__ = ["PRUNER_CLASSES", "QUANTIZER_METHODS", "prune_and_speedup", "quantize_weights", "quiet"]

QUANTIZER_METHODS: tuple[str, ...] = ("qat", "ptq")

_QUIET_LOGGER = logging.getLogger("hycomp.nni")
_QUIET_LOGGER.setLevel(logging.ERROR)
_QUIET_LOGGER.propagate = False
_QUIET_LOGGER.addHandler(logging.NullHandler())  # else logging's last-resort handler prints its errors


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence NNI's logging, prints and import-time warnings for the duration of the block."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        logging.getLogger("nni").setLevel(logging.ERROR)
        try:
            from nni.runtime.log import silence_stdout

            silence_stdout()
        except ImportError:  # pragma: no cover - layout of other NNI versions
            pass
        yield
        logging.getLogger("nni").setLevel(logging.ERROR)


def _pruner_classes() -> dict[str, type]:
    with quiet():
        from nni.compression.pruning import FPGMPruner, L1NormPruner, L2NormPruner
    return {"l1": L1NormPruner, "l2": L2NormPruner, "fpgm": FPGMPruner}


PRUNER_CLASSES: tuple[str, ...] = ("l1", "l2", "fpgm")


def _excluded(name: str, exclude: tuple[str, ...]) -> bool:
    return any(name == prefix or name.startswith(prefix + ".") for prefix in exclude)


def layer_ratios(
    model: nn.Module, sparsity: float, channel_multiple: int = 1, exclude: tuple[str, ...] = ()
) -> dict[str, float]:
    """Per-Conv2d sparse ratio so that each layer keeps a multiple of ``channel_multiple`` output
    channels (at least one multiple), as close as possible to keeping ``1 - sparsity`` of them.
    Convs named in ``exclude`` (or under a module named there) are left out.

    Inference kernels are faster on channel counts that fit their blocks, so a pruned layer can be slower
    than an unpruned one with unaligned counts. Layers that would keep everything are left out.
    """
    ratios = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Conv2d) or _excluded(name, exclude):
            continue
        channels = module.out_channels
        keep = channels * (1.0 - sparsity)
        if channel_multiple > 1 and channels >= channel_multiple:
            keep = max(channel_multiple, round(keep / channel_multiple) * channel_multiple)
        keep = min(channels, max(1, round(keep)))
        if keep < channels:
            ratios[name] = 1.0 - keep / channels
    return ratios


def prune_and_speedup(
    model: nn.Module,
    pruner: str,
    sparsity: float,
    example_input: torch.Tensor,
    channel_multiple: int = 1,
    exclude: tuple[str, ...] = (),
) -> nn.Module:
    """Mask Conv2d output channels with the named NNI pruner (dependency groups on, per-layer ratios
    from :func:`layer_ratios`, ``exclude`` left out), then let ModelSpeedup physically remove them.
    Returns the same module object, shrunk.
    """
    try:
        graph = torch.fx.symbolic_trace(model)
    except Exception as error:
        raise CompressionError(
            f"NNI pruning needs a torch.fx-traceable model, and tracing failed: {type(error).__name__}: "
            f"{error}. Make the forward free of data-dependent control flow, or prune with sparsity 0."
        ) from error
    grouped = _grouped_conv_layers(model, graph)
    exclude = tuple(exclude) + tuple(grouped)
    with quiet():
        from nni.compression.speedup import ModelSpeedup
        from nni.compression.utils import auto_set_denpendency_group_ids

        ratios = layer_ratios(model, sparsity, channel_multiple, exclude)
        if not ratios:
            raise CompressionError(
                f"sparsity {sparsity} with channel multiple {channel_multiple} removes no channel from any "
                "layer. Raise the sparsity or lower the channel multiple"
                + (
                    f"; grouped convs and their inputs stay unpruned ({', '.join(grouped[:4])})."
                    if grouped
                    else "."
                )
            )
        config_list = [{"op_names": [name], "sparse_ratio": ratio} for name, ratio in ratios.items()]
        try:
            config_list = auto_set_denpendency_group_ids(model, config_list, example_input)
            pruner_object = _pruner_classes()[pruner](model, config_list)
            _, masks = pruner_object.compress()
            pruner_object.unwrap_model()
        except Exception as error:
            raise CompressionError(f"NNI {pruner} pruner failed: {type(error).__name__}: {error}") from error
        if not masks:
            raise CompressionError(
                "NNI pruner selected no layer: the config matched nothing (op_types ['Conv2d']). "
                "The model has no Conv2d to prune."
            )
        try:
            # traced again after the pruner unwrapped its modules: the graph ModelSpeedup propagates masks
            # through must hold the modules as they are now (a trace from before keeps channel choices apart)
            graph = torch.fx.symbolic_trace(model)
            with _innermost_module(model) as failing:
                ModelSpeedup(
                    model, example_input, masks, graph_module=graph, logger=_QUIET_LOGGER
                ).speedup_model()
        except Exception as error:
            raise _speedup_error(model, graph, failing, error, "ModelSpeedup") from error
    probe = copy.deepcopy(model)  # runs once to name a failing module; the model's BatchNorm stays as is
    try:
        with _innermost_module(probe) as failing, torch.no_grad():
            probe(example_input)
    except Exception as error:
        raise _speedup_error(probe, graph, failing, error, "the pruned model") from error
    return model


def _grouped_conv_layers(model: nn.Module, graph: torch.fx.GraphModule) -> list[str]:
    """Grouped (not depthwise) convs and the convs feeding them: NNI's L1/L2/FPGM masks remove channels
    unevenly across groups, which its speedup refuses (``UnBalancedGroupError``); they stay unpruned."""
    names: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d) and 1 < module.groups < module.in_channels:
            names.append(name)
            names.extend(_producers(graph, name)[0])
    return names


def _producers(graph: torch.fx.GraphModule, module_name: str) -> tuple[list[str], list[str]]:
    """The Conv2d modules whose outputs reach ``module_name``'s input, and the operators in between."""
    modules = dict(graph.named_modules())

    def inside(node: torch.fx.Node) -> bool:
        stack = node.meta.get("nn_module_stack", {})
        return node.target == module_name or module_name in stack

    members = [node for node in graph.graph.nodes if inside(node)]
    convs: list[str] = []
    operators: list[str] = []
    pending = [source for node in members for source in node.all_input_nodes if not inside(source)]
    seen: set = set()
    while pending:
        node = pending.pop()
        if node in seen:
            continue
        seen.add(node)
        if node.op == "call_module" and isinstance(modules.get(node.target), nn.Conv2d):
            convs.append(str(node.target))
            continue
        if node.op in ("call_function", "call_method"):
            operators.append(getattr(node.target, "__name__", str(node.target)))
        elif node.op == "call_module":
            operators.append(type(modules[node.target]).__name__)
        pending.extend(node.all_input_nodes)
    return sorted(set(convs)), sorted(set(operators))


@contextlib.contextmanager
def _innermost_module(model: nn.Module) -> Iterator[list[str]]:
    """Yields a list that, when the block raises, holds the qualified name of the innermost module that
    was running (``""``: the error was outside any submodule)."""
    running: list[str] = []
    failing: list[str] = []

    def enter(name: str):
        def hook(module, inputs):
            running.append(name)

        return hook

    def leave(module, inputs, output):
        running.pop()

    handles = []
    for name, module in model.named_modules():
        if name:
            handles.append(module.register_forward_pre_hook(enter(name)))
            handles.append(module.register_forward_hook(leave))
    try:
        yield failing
    except Exception:
        failing.append(running[-1] if running else "")
        raise
    finally:
        for handle in handles:
            handle.remove()


def _speedup_error(
    model: nn.Module, graph: torch.fx.GraphModule, failing: list[str], error: Exception, stage: str
) -> CompressionError:
    """A CompressionError naming the module where NNI's channel removal broke, the operators through
    which its pruned input arrives and the convs to add to ``model.exclude``."""
    name = failing[0] if failing else ""
    if not name:
        return CompressionError(
            f"NNI could not remove the pruned channels ({stage} failed: {type(error).__name__}: {error}). "
            "Add the convs feeding the failing operation to model.exclude."
        )
    modules = dict(model.named_modules())
    kind = type(modules[name]).__name__ if name in modules else "module"
    convs, operators = _producers(graph, name)
    convs = convs or [name]
    through = f" through {', '.join(operators)}" if operators else ""
    return CompressionError(
        f"NNI 3.0 cannot prune the channels that reach module {name!r} ({kind}){through}: {stage} failed with "
        f"{type(error).__name__}: {error}. Add {', '.join(repr(conv) for conv in convs)} to model.exclude."
    )


def quantize_weights(
    model: nn.Module,
    bits: int,
    targets: dict[str, int],
    train_function: Callable[[nn.Module, torch.optim.Optimizer, Callable], None],
    step: Callable,
    lr: float,
    example_input: torch.Tensor,
    method: str = "qat",
) -> dict[str, dict[str, torch.Tensor]]:
    """Quantize the weights of the named layers with NNI: ``qat`` (QATQuantizer, trains through the
    fake quantization) or ``ptq`` (PtqQuantizer: ``train_function`` must only run forward passes).

    ``targets`` maps a layer name to its bit-width; ``train_function(model, optimizer, step)`` runs the
    training loop with the optimizer and step NNI hands in. Returns, per layer, the learned ``scale``,
    ``zero_point``, ``qmin`` and ``qmax`` of its weight. The model is unwrapped (plain modules) on return.
    """
    with quiet():
        import nni
        from nni.compression import TorchEvaluator
        from nni.compression.quantization import PtqQuantizer, QATQuantizer

        by_bits: dict[int, list[str]] = {}
        for name, layer_bits in targets.items():
            by_bits.setdefault(layer_bits, []).append(name)
        config_list = [
            {
                "op_names": names,
                "target_names": ["weight"],
                "quant_dtype": f"int{layer_bits}",
                "quant_scheme": "symmetric",
                "granularity": "out_channel",
            }
            for layer_bits, names in sorted(by_bits.items())
        ]

        def training_func(
            model, optimizers, training_step, lr_schedulers=None, max_steps=None, max_epochs=None
        ):
            optimizer = optimizers[0] if isinstance(optimizers, list | tuple) else optimizers
            train_function(model, optimizer, training_step)

        optimizer = nni.trace(torch.optim.SGD)(model.parameters(), lr=lr, momentum=0.9, nesterov=True)
        evaluator = TorchEvaluator(
            training_func, optimizer, step, dummy_input=example_input, evaluating_func=lambda _model: None
        )
        try:
            if method == "ptq":
                quantizer = PtqQuantizer(model, config_list, evaluator)
            else:
                quantizer = QATQuantizer(model, config_list, evaluator, quant_start_step=0)
            _, calibration = quantizer.compress(None, 1)
        except CompressionError:
            raise
        except Exception as error:
            raise CompressionError(
                f"NNI {method} quantizer failed: {type(error).__name__}: {error}"
            ) from error
        result: dict[str, dict[str, torch.Tensor]] = {}
        missing = []
        for name in targets:
            entry = calibration.get(name, {}).get("weight")
            if entry is None or entry.get("scale") is None:
                missing.append(name)
                continue
            qmax = 2 ** (int(entry["quant_bits"]) - 1) - 1
            result[name] = {
                "scale": entry["scale"].detach().clone(),
                "zero_point": entry["zero_point"].detach().clone(),
                "qmin": -qmax,
                "qmax": qmax,
            }
        quantizer.unwrap_model()
        if missing:
            raise CompressionError(
                f"NNI QAT left no scale for {len(missing)} layer(s) (e.g. {missing[0]!r}): quantization "
                "did not take effect. Train for at least one step."
            )
    return result
