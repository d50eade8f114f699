// libFuzzer target: any bytes given to the model reader must give either a model or an
// rnncore::Error, never a crash, a leak or undefined behaviour. A model that loads is also
// run once (predict and step) on a small input.
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "rnncore/model.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    try {
        rnncore::Model m = rnncore::Model::from_bytes(std::string(reinterpret_cast<const char*>(data), size));
        const int64_t T = 3, B = 2;
        if (m.input_size() > 4096 || m.output_size() > 4096) return 0;
        std::vector<float> x(T * B * m.input_size(), 0.0f), y(m.predict_size(T, B));
        m.predict(x.data(), T, B, y.data());
        if (m.streamable()) {
            auto st = m.new_state(B);
            std::vector<float> yt(B * m.output_size());
            m.step(x.data(), st, yt.data());
        }
    } catch (const rnncore::Error&) {
    }
    return 0;
}
