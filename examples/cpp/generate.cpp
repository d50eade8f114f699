// Loads a model saved from Python and runs it with no Python: the whole sequence at once
// (predict) and the same sequence step by step with a caller-held state; prints both, so
// a test can compare them with Python's outputs.
//   usage: rnncore_generate MODEL.rnnc T B  (reads T*B*I floats from stdin, time-major)
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "rnncore/model.hpp"

int main(int argc, char** argv) {
    if (argc != 4) {
        std::fprintf(stderr, "usage: %s MODEL T B < inputs\n", argv[0]);
        return 2;
    }
    try {
        rnncore::Model model = rnncore::Model::load(argv[1]);
        const long T = std::atol(argv[2]), B = std::atol(argv[3]);
        const long I = (long)model.input_size(), O = (long)model.output_size();
        std::vector<float> x(T * B * I);
        for (float& v : x)
            if (std::scanf("%f", &v) != 1) { std::fprintf(stderr, "not enough inputs\n"); return 2; }
        std::vector<float> y(model.predict_size(T, B));
        model.predict(x.data(), T, B, y.data());
        std::printf("predict");
        for (float v : y) std::printf(" %.9g", v);
        std::printf("\n");
        if (model.streamable()) {
            rnncore::Model::State state = model.new_state(B);
            std::vector<float> yt(B * O);
            std::printf("step");
            for (long t = 0; t < T; ++t) {
                model.step(x.data() + t * B * I, state, yt.data());
                for (float v : yt) std::printf(" %.9g", v);
            }
            std::printf("\n");
        }
        std::fprintf(stderr, "%s: %s\n", argv[1], model.summary().c_str());
    } catch (const rnncore::Error& e) {
        std::fprintf(stderr, "error: %s\n", e.what());
        return 1;
    }
    return 0;
}
