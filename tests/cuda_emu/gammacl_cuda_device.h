// The CPU emulator's <gammacl_cuda_device.h> (the real one: csrc/platform/): cuda_emu.h's stand-ins
// for the CUDA runtime, 16-bit types and GC_LAUNCH, and ex2.approx.ftz emulated. The emulator
// build (cuda_emu/build.py) puts this directory on the include path instead of csrc/platform/.
#pragma once

#include "cuda_emu.h"

inline float gc_ex2_approx_ftz(float x) { return gammacl_emu::ex2_approx_ftz(x); }
