/* rnncore C API: load a model saved from Python and run it, batch or step by step.
 *
 * Every function returns RNNCORE_OK (0) or an error code; rnncore_last_error() then gives
 * the message (per thread). No function throws or aborts on a bad file or argument.
 * A model may be used from several threads at once, each with its own state.
 * Data is time-major float32: x [T, B, I]; token models read ids stored as floats (I = 1). */
#ifndef RNNCORE_H
#define RNNCORE_H

#include <stdint.h>

#if defined(_WIN32)
#define RNNCORE_API __declspec(dllexport)
#else
#define RNNCORE_API __attribute__((visibility("default")))
#endif

#ifdef __cplusplus
extern "C" {
#endif

enum {
    RNNCORE_OK = 0,
    RNNCORE_ERROR_INVALID_ARGUMENT = 1, /* a null pointer, a bad size or value */
    RNNCORE_ERROR_FILE = 2,             /* the file cannot be opened or read */
    RNNCORE_ERROR_BAD_MODEL = 3,        /* damaged, unsupported or newer-format file */
    RNNCORE_ERROR_OUT_OF_MEMORY = 4,
    RNNCORE_ERROR_INTERNAL = 5
};

typedef struct rnncore_model rnncore_model;
typedef struct rnncore_state rnncore_state;

RNNCORE_API const char* rnncore_version(void);
RNNCORE_API const char* rnncore_last_error(void);
/* The buffers rnncore_predict keeps per thread between calls (so that repeated calls fault in
   no new pages; trimmed on their own as rnncore/layer.hpp says): rnncore_release_memory frees
   the calling thread's now and every other thread's at the start of its next call;
   rnncore_kept_memory returns the bytes the calling thread holds. */
RNNCORE_API void rnncore_release_memory(void);
RNNCORE_API int64_t rnncore_kept_memory(void);

RNNCORE_API int rnncore_model_load(const char* path, rnncore_model** out);
/* Precision of the recurrent weights (W_hh, W_hr) in predict and step. BFLOAT16 rounds them
 * to bfloat16 (nearest even) and streams them at half the bytes per step; the input
 * projection, states and sums stay float32. */
enum { RNNCORE_PRECISION_FLOAT32 = 0, RNNCORE_PRECISION_BFLOAT16 = 1 };
RNNCORE_API int rnncore_model_load_with_precision(const char* path, int recurrent_precision,
                                                  rnncore_model** out);
RNNCORE_API void rnncore_model_free(rnncore_model* model);
RNNCORE_API int64_t rnncore_model_input_size(const rnncore_model* model);   /* -1 on error */
RNNCORE_API int64_t rnncore_model_output_size(const rnncore_model* model);
RNNCORE_API int rnncore_model_many_to_one(const rnncore_model* model);      /* 1, 0, or -1 */

/* y receives [T, B, O] floats, or [B, O] for a many-to-one model; y_capacity is the number
 * of floats y can hold. lengths [B] (1..T) may be NULL. */
RNNCORE_API int rnncore_predict(const rnncore_model* model, const float* x, int64_t T, int64_t B,
                                int64_t I, const int64_t* lengths, float* y, int64_t y_capacity);

RNNCORE_API int rnncore_state_create(const rnncore_model* model, int64_t B, rnncore_state** out);
RNNCORE_API int rnncore_state_reset(rnncore_state* state);
RNNCORE_API void rnncore_state_free(rnncore_state* state);
/* One step: x [B, I] -> y [B, O]; the state advances. */
RNNCORE_API int rnncore_step(const rnncore_model* model, rnncore_state* state, const float* x,
                             int64_t B, int64_t I, float* y, int64_t y_capacity);

#ifdef __cplusplus
}
#endif
#endif /* RNNCORE_H */
