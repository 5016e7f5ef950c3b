"""``vllm.general_plugins`` entry point (vLLM 0.32, ``vllm.plugins.load_general_plugins``).

vLLM calls ``register()`` in every process it starts, also for engines that do not use
kvdedup. kvdedup needs no registration (its scheduler and connector are named by module
path), so the hook only runs the version gate and warns when it fails: a stock engine must
still start where kvdedup is installed. An engine configured with kvdedup fails at
start-up anyway, when vLLM imports kvdedup's scheduler or connector (``vllm_ext.version``).
"""


def register() -> None:
    from .version import check_vllm_version

    try:
        check_vllm_version()
    except Exception as exc:  # noqa: BLE001 - a stock engine must still start: warn only
        import logging

        logging.getLogger("kvdedup").warning("%s (kvdedup's hooks will refuse to load)", exc)
