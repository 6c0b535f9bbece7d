import os

from nanosd_lib.outputs import machine

# Two cores of /proc/cpuinfo, trimmed: the fields repeat per core, and only the first core's are read.
ZEN3 = """processor\t: 0
model name\t: AMD EPYC
flags\t\t: fpu sse2 avx avx2 fma
processor\t: 1
model name\t: AMD EPYC
flags\t\t: fpu sse2 avx avx2 fma
"""
ZEN4 = ZEN3.replace("avx2 fma", "avx2 fma avx512f avx512bw avx512_vnni")
ARM = "processor\t: 0\nFeatures\t: fp asimd evtstrm crc32\n"


def test_machine_names_the_vector_units_that_choose_the_kernels():
    cores = f"{os.cpu_count()} cores"
    assert machine(ZEN3) == f"AMD EPYC ({cores}, AVX2)"
    assert machine(ZEN4) == f"AMD EPYC ({cores}, AVX-512, VNNI)"
    # no model name: the platform's own name stands in, and the units still come from the flags
    assert machine(ARM).endswith(f"({cores}, NEON)")
    assert machine("").endswith(f"({cores})")


def test_the_fingerprint_sees_where_a_file_sits_and_what_it_holds(tmp_path):
    from nanosd_lib.outputs import fingerprint

    a, b = tmp_path / "a", tmp_path / "b"
    for root, sub in ((a, "unet"), (b, "vae")):  # the same file, the same bytes, in another subfolder
        (root / sub).mkdir(parents=True)
        (root / sub / "config.json").write_text("X")
    assert fingerprint({"k": 1}, a) != fingerprint({"k": 1}, b)
    before = fingerprint({"k": 1}, a)
    assert fingerprint({"k": 1}, a) == before and fingerprint({"k": 2}, a) != before
    (a / "unet" / "config.json").write_text("W")
    assert fingerprint({"k": 1}, a) != before
