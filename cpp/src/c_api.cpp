// The C API over rnncore::Model: no exception crosses the boundary; errors become codes and
// a per-thread message.
#include "rnncore/rnncore.h"

#include <fstream>
#include <new>
#include <stdexcept>
#include <string>

#include "rnncore/model.hpp"
#include "rnncore/runtime.hpp"

struct rnncore_model {
    rnncore::Model m;
};
struct rnncore_state {
    const rnncore_model* owner;
    rnncore::Model::State s;
};

namespace {
thread_local std::string last_error;

int fail(int code, const char* msg) {
    try { last_error = msg; } catch (...) {}
    return code;
}

// Runs f; rnncore::Error becomes error_code, everything else its own code.
template <class F> int guarded(int error_code, F&& f) {
    try {
        f();
        return RNNCORE_OK;
    } catch (const rnncore::Error& e) {
        return fail(error_code, e.what());
    } catch (const std::bad_alloc&) {
        return fail(RNNCORE_ERROR_OUT_OF_MEMORY, "out of memory");
    } catch (const std::invalid_argument& e) {
        return fail(RNNCORE_ERROR_INVALID_ARGUMENT, e.what());
    } catch (const std::exception& e) {
        return fail(RNNCORE_ERROR_INTERNAL, e.what());
    } catch (...) {
        return fail(RNNCORE_ERROR_INTERNAL, "unknown error");
    }
}
}  // namespace

extern "C" {

const char* rnncore_version(void) { return rnncore::version(); }
const char* rnncore_last_error(void) { return last_error.c_str(); }
void rnncore_release_memory(void) { rnncore::release_memory(); }
int64_t rnncore_kept_memory(void) { return rnncore::kept_memory_bytes(); }

int rnncore_model_load_with_precision(const char* path, int recurrent_precision, rnncore_model** out) {
    if (!out) return fail(RNNCORE_ERROR_INVALID_ARGUMENT, "out: NULL");
    *out = nullptr;
    if (!path) return fail(RNNCORE_ERROR_INVALID_ARGUMENT, "path: NULL");
    if (recurrent_precision != RNNCORE_PRECISION_FLOAT32 && recurrent_precision != RNNCORE_PRECISION_BFLOAT16)
        return fail(RNNCORE_ERROR_INVALID_ARGUMENT,
                    "recurrent_precision: expected RNNCORE_PRECISION_FLOAT32 (0) or RNNCORE_PRECISION_BFLOAT16 (1)");
    const rnncore::Precision prec = recurrent_precision == RNNCORE_PRECISION_BFLOAT16
                                        ? rnncore::Precision::BFloat16 : rnncore::Precision::Float32;
    {
        std::ifstream probe(path, std::ios::binary);
        if (!probe) {
            try { last_error = std::string(path) + ": cannot open the file"; } catch (...) {}
            return RNNCORE_ERROR_FILE;
        }
    }
    return guarded(RNNCORE_ERROR_BAD_MODEL, [&] {
        rnncore::Model m = rnncore::Model::load(path, prec);
        *out = new rnncore_model{std::move(m)};
    });
}

int rnncore_model_load(const char* path, rnncore_model** out) {
    return rnncore_model_load_with_precision(path, RNNCORE_PRECISION_FLOAT32, out);
}

void rnncore_model_free(rnncore_model* model) { delete model; }

int64_t rnncore_model_input_size(const rnncore_model* model) {
    if (!model) { fail(RNNCORE_ERROR_INVALID_ARGUMENT, "model: NULL"); return -1; }
    return model->m.input_size();
}

int64_t rnncore_model_output_size(const rnncore_model* model) {
    if (!model) { fail(RNNCORE_ERROR_INVALID_ARGUMENT, "model: NULL"); return -1; }
    return model->m.output_size();
}

int rnncore_model_many_to_one(const rnncore_model* model) {
    if (!model) { fail(RNNCORE_ERROR_INVALID_ARGUMENT, "model: NULL"); return -1; }
    return model->m.many_to_one() ? 1 : 0;
}

int rnncore_predict(const rnncore_model* model, const float* x, int64_t T, int64_t B, int64_t I,
                    const int64_t* lengths, float* y, int64_t y_capacity) {
    if (!model || !x || !y) return fail(RNNCORE_ERROR_INVALID_ARGUMENT, "model, x and y must not be NULL");
    return guarded(RNNCORE_ERROR_INVALID_ARGUMENT, [&] {
        if (I != model->m.input_size())
            throw rnncore::Error("I: expected " + std::to_string(model->m.input_size()) + ", got " + std::to_string(I));
        if (T < 1 || B < 1) throw rnncore::Error("T, B: expected positive sizes");
        const int64_t need = model->m.predict_size(T, B);
        if (y_capacity < need)
            throw rnncore::Error("y_capacity: expected at least " + std::to_string(need) + " floats, got " +
                                 std::to_string(y_capacity));
        model->m.predict(x, T, B, y, lengths);
    });
}

int rnncore_state_create(const rnncore_model* model, int64_t B, rnncore_state** out) {
    if (!out) return fail(RNNCORE_ERROR_INVALID_ARGUMENT, "out: NULL");
    *out = nullptr;
    if (!model) return fail(RNNCORE_ERROR_INVALID_ARGUMENT, "model: NULL");
    return guarded(RNNCORE_ERROR_INVALID_ARGUMENT, [&] {
        rnncore::Model::State s = model->m.new_state(B);
        *out = new rnncore_state{model, std::move(s)};
    });
}

int rnncore_state_reset(rnncore_state* state) {
    if (!state) return fail(RNNCORE_ERROR_INVALID_ARGUMENT, "state: NULL");
    state->s.reset();
    return RNNCORE_OK;
}

void rnncore_state_free(rnncore_state* state) { delete state; }

int rnncore_step(const rnncore_model* model, rnncore_state* state, const float* x, int64_t B,
                 int64_t I, float* y, int64_t y_capacity) {
    if (!model || !state || !x || !y) return fail(RNNCORE_ERROR_INVALID_ARGUMENT, "model, state, x and y must not be NULL");
    if (state->owner != model) return fail(RNNCORE_ERROR_INVALID_ARGUMENT, "state: it was created for another model");
    return guarded(RNNCORE_ERROR_INVALID_ARGUMENT, [&] {
        if (B != state->s.batch)
            throw rnncore::Error("B: the state holds " + std::to_string(state->s.batch) + " rows, got " + std::to_string(B));
        if (I != model->m.input_size())
            throw rnncore::Error("I: expected " + std::to_string(model->m.input_size()) + ", got " + std::to_string(I));
        if (y_capacity < B * model->m.output_size())
            throw rnncore::Error("y_capacity: expected at least " + std::to_string(B * model->m.output_size()) + " floats");
        model->m.step(x, state->s, y);
    });
}

}  // extern "C"
