"""The op layer stands alone: ``import omnicache.ops`` loads no model, runtime or policy
code, and the package's public names are imported lazily (PEP 562).

numpy is not tested: torch itself imports it.
"""

import ast
import os
import subprocess
import sys

import pytest

import omnicache

# Not one of these, nor any submodule of them, may be imported by ``import omnicache.ops``.
HEAVY = ("omnicache.api", "omnicache.runtime", "omnicache.policies", "omnicache.integrations")

CONFIGS = ("NoCacheConfig", "FORAConfig", "DeltaDiTConfig", "TeaCacheConfig",
           "FirstBlockCacheConfig", "TaylorSeerConfig", "OmniCacheConfig", "L2CConfig",
           "MagCacheConfig", "PABConfig", "TGATEConfig", "ToCaConfig", "AdaCacheConfig")
PUBLIC = ("ops", "generate", "GenerateResult", "load_default", "load_classifier", "CachePlan",
          "fit_correction", *CONFIGS)


def fresh_modules(code: str) -> list[str]:
    """``sorted(sys.modules)`` after running ``code`` in a fresh interpreter."""
    env = dict(os.environ, PYTHONSAFEPATH="1")
    env.pop("OMNICACHE_BACKEND", None)
    proc = subprocess.run([sys.executable, "-c", f"{code}\nimport sys; print(sorted(sys.modules))"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return ast.literal_eval(proc.stdout.strip().splitlines()[-1])


def heavy(modules: list[str]) -> list[str]:
    return [m for m in modules if any(m == h or m.startswith(h + ".") for h in HEAVY)]


def test_import_ops_loads_no_runtime_policy_or_integration():
    modules = fresh_modules("import omnicache.ops")
    assert "omnicache.ops" in modules
    assert heavy(modules) == []


def test_import_omnicache_is_lazy():
    assert heavy(fresh_modules("import omnicache")) == []


def test_public_names():
    assert sorted(omnicache.__all__) == sorted(PUBLIC)
    assert set(PUBLIC) <= set(dir(omnicache))


@pytest.mark.parametrize("name", PUBLIC)
def test_every_public_name_resolves(name):
    assert getattr(omnicache, name) is not None
    namespace = {}
    exec(f"from omnicache import {name}", namespace)
    assert namespace[name] is getattr(omnicache, name)


@pytest.mark.parametrize("name", CONFIGS)
def test_every_policy_config_is_the_policies_one(name):
    import omnicache.policies

    assert getattr(omnicache, name) is getattr(omnicache.policies, name)


def test_ops_is_the_submodule():
    import omnicache.ops

    assert omnicache.ops is sys.modules["omnicache.ops"]


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'NoSuchConfig'"):
        omnicache.NoSuchConfig  # noqa: B018
    assert not hasattr(omnicache, "NoSuchConfig")
