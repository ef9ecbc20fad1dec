"""mamba_ssm's package __init__ (its model zoo, transformers, scikit-learn: seconds per pipeline job)
runs only when a name of the package itself is used, never for the kernel modules scan.py imports."""
import subprocess
import sys
import textwrap

PROBE = textwrap.dedent("""
    import sys
    import mambapeft.models.scan
    print("init ran on import:", "mamba_ssm_init_ran" in sys.modules)
    from mamba_ssm.ops.kernels import KERNEL
    print("submodule:", KERNEL, "init ran:", "mamba_ssm_init_ran" in sys.modules)
    from mamba_ssm import MODEL
    print("package name:", MODEL, "init ran:", "mamba_ssm_init_ran" in sys.modules)
""")


def test_kernel_modules_import_without_the_package_init(tmp_path):
    package = tmp_path / "mamba_ssm"
    (package / "ops").mkdir(parents=True)
    (package / "__init__.py").write_text("import sys, types\nsys.modules['mamba_ssm_init_ran'] = types.ModuleType('x')\n"
                                        "from mamba_ssm.ops.kernels import KERNEL\nMODEL = 'model'\n")
    (package / "ops" / "__init__.py").write_text("")
    (package / "ops" / "kernels.py").write_text("KERNEL = 'kernel'\n")
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": f"{tmp_path}:{':'.join(sys.path)}", "PATH": ""}).stdout
    assert out.splitlines() == ["init ran on import: False", "submodule: kernel init ran: False",
                                "package name: model init ran: True"]
