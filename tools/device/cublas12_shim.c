/* libcublas.so.12 for the faiss-gpu wheel (built against CUDA 12) on a machine that has only
   CUDA 13: the eight cuBLAS entry points libfaiss.so imports, forwarded to libcublas.so.13,
   whose C signatures for them are unchanged. Built by tools/device/prepare.sh. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
typedef int st;
static void *lib;
static void *sym(const char *name) {
  if (!lib) lib = dlopen("libcublas.so.13", RTLD_NOW | RTLD_GLOBAL);
  void *f = lib ? dlsym(lib, name) : NULL;
  if (!f) { fprintf(stderr, "cublas shim: %s: %s\n", name, dlerror()); abort(); }
  return f;
}
#define FWD(name, params, args) \
  st name params { static st (*f) params; if (!f) f = (st (*) params) sym(#name); return f args; }
FWD(cublasCreate_v2, (void **h), (h))
FWD(cublasDestroy_v2, (void *h), (h))
FWD(cublasSetStream_v2, (void *h, void *s), (h, s))
FWD(cublasGetMathMode, (void *h, int *m), (h, m))
FWD(cublasSetMathMode, (void *h, int m), (h, m))
FWD(cublasSgemmEx, (void *h, int ta, int tb, int m, int n, int k, const float *al, const void *A,
    int At, int lda, const void *B, int Bt, int ldb, const float *be, void *C, int Ct, int ldc),
    (h, ta, tb, m, n, k, al, A, At, lda, B, Bt, ldb, be, C, Ct, ldc))
FWD(cublasGemmEx, (void *h, int ta, int tb, int m, int n, int k, const void *al, const void *A,
    int At, int lda, const void *B, int Bt, int ldb, const void *be, void *C, int Ct, int ldc,
    int ct, int algo),
    (h, ta, tb, m, n, k, al, A, At, lda, B, Bt, ldb, be, C, Ct, ldc, ct, algo))
FWD(cublasGemmStridedBatchedEx, (void *h, int ta, int tb, int m, int n, int k, const void *al,
    const void *A, int At, int lda, long long sA, const void *B, int Bt, int ldb, long long sB,
    const void *be, void *C, int Ct, int ldc, long long sC, int batch, int ct, int algo),
    (h, ta, tb, m, n, k, al, A, At, lda, sA, B, Bt, ldb, sB, be, C, Ct, ldc, sC, batch, ct, algo))
