// LD_PRELOAD library that makes an AVX-512 machine look like an AVX2 one to the process: every
// CPUID the process runs reports no AVX-512, no AVX-VNNI and no AMX, so ONNX Runtime's MLAS,
// llama.cpp's runtime dispatch and Rust's feature detection all pick their AVX2 kernels. Used by
// `just bench-llamacpp` to measure the AVX2 kernels of a board-class x86 CPU on a newer host.
//
// How: Linux's CPUID faulting (arch_prctl ARCH_SET_CPUID; /proc/cpuinfo flag `cpuid_fault`).
// With it on, CPUID raises SIGSEGV; the handler runs the real CPUID with faulting briefly off,
// clears the feature bits and steps over the instruction. The setting is per thread and threads
// inherit it, so it is turned on in a constructor before the program starts its workers.
// Limits: the dynamic loader asks CPUID before any constructor runs, so glibc's own string
// routines may still use their AVX-512 variants; clocks and memory stay the host's.
//
// build: cc -O2 -shared -fPIC -o avx2_only.so avx2_only.c
#define _GNU_SOURCE
#include <asm/prctl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

static void set_faulting(int on) { syscall(SYS_arch_prctl, ARCH_SET_CPUID, on ? 0 : 1); }

static void real_cpuid(uint32_t leaf, uint32_t sub, uint32_t r[4]) {
    __asm__ volatile("cpuid" : "=a"(r[0]), "=b"(r[1]), "=c"(r[2]), "=d"(r[3]) : "a"(leaf), "c"(sub));
}

// Bits of CPUID leaf 7 that name AVX-512, AVX-VNNI or AMX features.
#define BIT(n) (1u << (n))
static const uint32_t leaf7_ebx = BIT(16) | BIT(17) | BIT(21) | BIT(26) | BIT(27) | BIT(28) | BIT(30) | BIT(31);
static const uint32_t leaf7_ecx = BIT(1) | BIT(6) | BIT(11) | BIT(12) | BIT(14);
static const uint32_t leaf7_edx = BIT(2) | BIT(3) | BIT(8) | BIT(22) | BIT(23) | BIT(24) | BIT(25);
// Subleaf 1: AVX-VNNI, AVX512_BF16, AVX-IFMA in EAX; AVX-VNNI-INT8, AVX-NE-CONVERT in EDX.
static const uint32_t leaf7s1_eax = BIT(4) | BIT(5) | BIT(23);
static const uint32_t leaf7s1_edx = BIT(4) | BIT(5);

static void on_segv(int sig, siginfo_t *info, void *ctx) {
    ucontext_t *uc = ctx;
    greg_t *g = uc->uc_mcontext.gregs;
    // A faulting CPUID arrives as a general-protection fault (SI_KERNEL); a page fault (a bad
    // jump, say) may have an unreadable instruction pointer, so it is not looked at.
    const unsigned char *ip = (const unsigned char *)g[REG_RIP];
    if (info->si_code != SI_KERNEL || ip[0] != 0x0f || ip[1] != 0xa2) {
        // A real fault: let it happen again without this handler.
        signal(sig, SIG_DFL);
        return;
    }
    uint32_t leaf = (uint32_t)g[REG_RAX], sub = (uint32_t)g[REG_RCX], r[4];
    set_faulting(0);
    real_cpuid(leaf, sub, r);
    set_faulting(1);
    if (leaf == 7 && sub == 0) {
        r[1] &= ~leaf7_ebx;
        r[2] &= ~leaf7_ecx;
        r[3] &= ~leaf7_edx;
    } else if (leaf == 7 && sub == 1) {
        r[0] &= ~leaf7s1_eax;
        r[3] &= ~leaf7s1_edx;
    }
    g[REG_RAX] = r[0];
    g[REG_RBX] = r[1];
    g[REG_RCX] = r[2];
    g[REG_RDX] = r[3];
    g[REG_RIP] += 2;
}

__attribute__((constructor)) static void avx2_only_init(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_segv;
    sa.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGSEGV, &sa, NULL) != 0 || syscall(SYS_arch_prctl, ARCH_SET_CPUID, 0) != 0) {
        fprintf(stderr, "avx2_only: CPUID faulting is not available here (no cpuid_fault flag?)\n");
        exit(97);
    }
}
