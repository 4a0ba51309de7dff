// Tensor-core instructions for fastattn's numba kernels (fastattn/cuda/_mma.py declares them).
//
// numba has no MMA API, so the kernels call these extern "C" device functions, declared with
// numba.cuda.declare_device and linked into each kernel with link-time optimisation (nvJitLink):
// the calls inline and every operand stays in a register.  Each function follows numba's calling
// convention for foreign device functions: the result is written through the first argument, the
// return value is a status (always 0).
//
// PTX ISA references: "Warp-level matrix multiply-accumulate instructions: mma" (the m16n8k16
// floating-point fragment layouts) and "ldmatrix"; fastattn/cuda/_mma.py spells the layouts out.

struct fastattn_f32x4 { float x, y, z, w; };
struct fastattn_u32x4 { unsigned x, y, z, w; };

// D = A B + C with A 16x16 (row-major), B 16x8 (column-major) in float16 or bfloat16 (TYPE), C and D
// 16x8 float32: fastattn_mma_f16 and fastattn_mma_bf16.
// Not volatile: a pure function of its registers, which the compiler may schedule (a volatile mma
// pins the order and costs the paged prefill at D = 128 a spill).
#define FASTATTN_MMA(NAME, TYPE)                                                                         \
    extern "C" __device__ int NAME(fastattn_f32x4 *d, unsigned a0, unsigned a1, unsigned a2,            \
                                   unsigned a3, unsigned b0, unsigned b1, float c0, float c1, float c2,  \
                                   float c3)                                                             \
    {                                                                                                    \
        asm("mma.sync.aligned.m16n8k16.row.col.f32." TYPE "." TYPE ".f32 "                              \
            "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%10, %11, %12, %13};"                        \
            : "=f"(d->x), "=f"(d->y), "=f"(d->z), "=f"(d->w)                                             \
            : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1),                                      \
              "f"(c0), "f"(c1), "f"(c2), "f"(c3));                                                       \
        return 0;                                                                                        \
    }

FASTATTN_MMA(fastattn_mma_f16, "f16")
FASTATTN_MMA(fastattn_mma_bf16, "bf16")

// Two float32 rounded to nearest even into one register of two 16-bit values of TYPE, lo in the low
// half: fastattn_pack_f16 and fastattn_pack_bf16.
#define FASTATTN_PACK(NAME, TYPE)                                                                        \
    extern "C" __device__ int NAME(unsigned *r, float lo, float hi)                                     \
    {                                                                                                    \
        asm("cvt.rn." TYPE "x2.f32 %0, %1, %2;" : "=r"(*r) : "f"(hi), "f"(lo));                          \
        return 0;                                                                                        \
    }

FASTATTN_PACK(fastattn_pack_f16, "f16")
FASTATTN_PACK(fastattn_pack_bf16, "bf16")

// Four 8x8 tiles of 16-bit values from shared memory, transposed: lane i gives the address of row
// i % 8 of tile i / 8 (16 bytes, 16-byte aligned); register m of lane (g, t) = (lane / 4, lane % 4)
// receives rows 2t and 2t + 1 of tile m at column g (the B fragments of two 8-column tiles of a
// row-major [k, n] matrix: registers 0, 1 for columns 0-7, registers 2, 3 for columns 8-15).
extern "C" __device__ int fastattn_ldmatrix_x4_trans(fastattn_u32x4 *r, const unsigned *base, int offset)
{
    unsigned address = (unsigned)__cvta_generic_to_shared(base + offset);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r->x), "=r"(r->y), "=r"(r->z), "=r"(r->w)
                 : "r"(address)
                 : "memory");  // reads what the block stored before its barrier
    return 0;
}
