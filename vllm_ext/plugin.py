"""``vllm.general_plugins`` entry point (vLLM 0.32, ``vllm.plugins.load_general_plugins``).

vLLM calls ``register()`` in every process it starts, also for engines that do not use
kvdedup. Its scheduler and connector are named by module path; the one registration is
shared mode's attention backend, installed (vLLM's attention-backend registry) when
``KVDEDUP_SHARED_ATTENTION=1`` (``vllm_ext.launch.dedup_env``). Otherwise the hook only
runs the version gate and warns when it fails: a stock engine must still start where
kvdedup is installed. An engine configured with kvdedup fails at start-up anyway, when
vLLM imports kvdedup's scheduler, connector or attention backend (``vllm_ext.version``).
"""


def register() -> None:
    import os

    from .launch import SHARED_ENV
    from .version import check_vllm_version

    if os.environ.get(SHARED_ENV) == "1":
        from .attention import install

        install()

    try:
        check_vllm_version()
    except Exception as exc:  # noqa: BLE001 - a stock engine must still start: warn only
        import logging

        logging.getLogger("kvdedup").warning("%s (kvdedup's hooks will refuse to load)", exc)
