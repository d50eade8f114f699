/* Loads a model saved from Python through the C API and runs it on inputs read from stdin:
 * predict over the whole batch, then step by step; prints the outputs (and, for a
 * classifier, the winning class of each sequence).
 *   usage: rnncore_classify MODEL.rnnc T B  (reads T*B*I floats, time-major) */
#include <stdio.h>
#include <stdlib.h>

#include "rnncore/rnncore.h"

int main(int argc, char** argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s MODEL T B < inputs\n", argv[0]);
        return 2;
    }
    rnncore_model* model = NULL;
    if (rnncore_model_load(argv[1], &model) != RNNCORE_OK) {
        fprintf(stderr, "error: %s\n", rnncore_last_error());
        return 1;
    }
    const int64_t T = atol(argv[2]), B = atol(argv[3]);
    const int64_t I = rnncore_model_input_size(model), O = rnncore_model_output_size(model);
    const int m2o = rnncore_model_many_to_one(model);
    float* x = malloc(sizeof(float) * T * B * I);
    const int64_t ny = (m2o ? B : T * B) * O;
    float* y = malloc(sizeof(float) * ny);
    int rc = 0;
    for (int64_t i = 0; i < T * B * I; ++i)
        if (scanf("%f", &x[i]) != 1) { fprintf(stderr, "not enough inputs\n"); rc = 2; goto done; }
    if (rnncore_predict(model, x, T, B, I, NULL, y, ny) != RNNCORE_OK) {
        fprintf(stderr, "error: %s\n", rnncore_last_error());
        rc = 1;
        goto done;
    }
    printf("predict");
    for (int64_t i = 0; i < ny; ++i) printf(" %.9g", y[i]);
    printf("\n");
    if (m2o) {
        for (int64_t b = 0; b < B; ++b) {
            int64_t best = 0;
            for (int64_t k = 1; k < O; ++k)
                if (y[b * O + k] > y[b * O + best]) best = k;
            fprintf(stderr, "sequence %lld: class %lld\n", (long long)b, (long long)best);
        }
    }
    rnncore_state* state = NULL;
    if (rnncore_state_create(model, B, &state) == RNNCORE_OK) {
        float* yt = malloc(sizeof(float) * B * O);
        printf("step");
        for (int64_t t = 0; t < T; ++t) {
            if (rnncore_step(model, state, x + t * B * I, B, I, yt, B * O) != RNNCORE_OK) {
                fprintf(stderr, "error: %s\n", rnncore_last_error());
                rc = 1;
                break;
            }
            for (int64_t i = 0; i < B * O; ++i) printf(" %.9g", yt[i]);
        }
        printf("\n");
        free(yt);
        rnncore_state_free(state);
    }
done:
    free(x);
    free(y);
    rnncore_model_free(model);
    return rc;
}
