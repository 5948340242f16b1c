"""The CLI silences known-harmless third-party warnings and nothing of vlm's own."""

import warnings

from vlm.core.quiet import silence_third_party_warnings


def _shown(category, message, module):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert silence_third_party_warnings()
        warnings.warn_explicit(message, category, "x.py", 1, module=module)
    return [str(w.message) for w in caught]


def test_transformers_deprecations_are_silenced_and_vlm_warnings_are_not(monkeypatch):
    monkeypatch.delenv("VLM_SHOW_WARNINGS", raising=False)
    assert _shown(FutureWarning, "`is_gradient_checkpointing` is deprecated", "transformers.modeling_utils") == []
    assert _shown(FutureWarning, "x is deprecated", "peft.tuners") == []
    assert _shown(UserWarning, "vlm: something to act on", "vlm.training.trainer") == ["vlm: something to act on"]
    assert _shown(UserWarning, "a real transformers problem", "transformers.x") == ["a real transformers problem"]


def test_vlm_show_warnings_keeps_them(monkeypatch):
    monkeypatch.setenv("VLM_SHOW_WARNINGS", "1")
    assert not silence_third_party_warnings()
