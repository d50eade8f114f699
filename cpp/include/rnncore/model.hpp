// rnncore: loading a model saved from Python (model.save / layer.save) and running it from
// C++ with no Python: a batch at once (predict) or step by step with a caller-held state.
//
// Supported: float32 Sequential models of Embedding, OneHot, RNN/LSTM/GRU (every variant;
// bidirectional layers in predict only), Dense, Dropout (the identity here) and LastStep,
// and bare RNN/LSTM/GRU layers. Data is time-major: x [T, B, I] where I is the model's input
// size; a model that starts with Embedding or OneHot reads token ids stored as floats, I = 1.
#pragma once

#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "rnncore/layer.hpp"   // Precision

namespace rnncore {

// Every error of the loader and of Model's methods: a damaged file, a bad argument.
class Error : public std::runtime_error {
  public:
    using std::runtime_error::runtime_error;
};

class Model {
  public:
    // Reads and validates the file (every length, offset, dtype, shape and checksum is
    // checked before any tensor is used). Throws rnncore::Error.
    // recurrent_precision: Precision::BFloat16 rounds the recurrent weights (W_hh, W_hr) to
    // bfloat16 for predict and step (half the bytes per step; see Precision in layer.hpp).
    static Model load(const std::string& path, Precision recurrent_precision = Precision::Float32);
    static Model from_bytes(const std::string& bytes, const std::string& name = "<bytes>",
                            Precision recurrent_precision = Precision::Float32);
    Precision recurrent_precision() const;

    int64_t input_size() const;     // features per step (1 for token models)
    int64_t output_size() const;    // features of each output
    bool token_input() const;       // starts with Embedding or OneHot
    bool many_to_one() const;       // has a LastStep: predict returns [B, O]
    bool streamable() const;        // no bidirectional layer: step() is available
    std::string summary() const;

    // x [T, B, I]; lengths [B] (1..T) or null; y [T, B, O], or [B, O] when many_to_one().
    void predict(const float* x, int64_t steps, int64_t batch, float* y,
                 const int64_t* lengths = nullptr) const;
    int64_t predict_size(int64_t steps, int64_t batch) const;   // floats predict writes

    // Streaming: one state per stream of batch rows; step() reads x [B, I] and writes
    // y [B, O]. A Model may be shared by many threads, each with its own State.
    struct State {
        int64_t batch = 0;
        std::vector<std::vector<float>> h, c;   // per recurrent block
        void reset();
    };
    State new_state(int64_t batch) const;
    void step(const float* x, State& state, float* y) const;

    struct Impl;
    Model();
    ~Model();
    Model(Model&&) noexcept;
    Model& operator=(Model&&) noexcept;

  private:
    std::shared_ptr<const Impl> impl_;
};

}  // namespace rnncore
