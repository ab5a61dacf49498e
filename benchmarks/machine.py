"""The line every benchmark table starts with: which CPU it ran on and how busy the machine was."""
import os
import platform

# the ISA extensions pyllama's kernels use (or would use) where the compiler targets them
ISA = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16")


def cpu_line():
    """'CPU: <model name>, N cores, ISA: avx2 fma ... (load average L)' from /proc/cpuinfo."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and name in ("", platform.machine(), platform.processor()):
                    name = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    isa = " ".join(f for f in ISA if f in flags) or "unknown (no /proc/cpuinfo)"
    try:
        load = f", load average {os.getloadavg()[0]:.1f} before the run"
    except OSError:
        load = ""
    return f"CPU: {name}, {os.cpu_count()} cores, ISA: {isa}{load}"


if __name__ == "__main__":
    print(cpu_line())
