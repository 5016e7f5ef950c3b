"""``vllm.general_plugins`` entry point (vLLM 0.32, ``vllm.plugins.load_general_plugins``).

vLLM calls ``register()`` in every process it starts. kvdedup needs no registration (its
scheduler and connector are named by module path); the hook only fails loudly when the
installed vLLM is not the series kvdedup's hooks were written for, and only when the
engine is actually configured to use kvdedup.
"""


def register() -> None:
    import os

    if os.environ.get("KVDEDUP_SHARED_ATTENTION") == "1":  # shared mode (vllm_ext.launch)
        from .attention import install

        install()
    if os.environ.get("KVDEDUP_SKIP_VERSION_CHECK") == "1":
        return
    from .version import check_vllm_version

    try:
        check_vllm_version()
    except Exception as exc:  # a stock engine must still start: warn only
        import logging

        logging.getLogger("kvdedup").warning("%s (kvdedup's hooks will refuse to load)", exc)
