// The C++ reader of the saved-model file (safetensors + rnncore metadata, see
// python/rnncore/io.py for the format) and the Model that runs it. Hardened: every length,
// offset, dtype, shape and checksum is checked before a byte of tensor data is used.
#include "rnncore/model.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <sstream>

#include "json.hpp"
#include "rnncore/layer.hpp"

namespace rnncore {

namespace {

constexpr uint64_t MAX_HEADER = 64ull * 1024 * 1024;
constexpr int FORMAT_VERSION = 1;

uint32_t crc32(const unsigned char* p, size_t n) {
    static uint32_t table[256];
    static bool init = [] {
        for (uint32_t i = 0; i < 256; ++i) {
            uint32_t c = i;
            for (int k = 0; k < 8; ++k) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
            table[i] = c;
        }
        return true;
    }();
    (void)init;
    uint32_t c = 0xFFFFFFFFu;
    for (size_t i = 0; i < n; ++i) c = table[(c ^ p[i]) & 0xFF] ^ (c >> 8);
    return c ^ 0xFFFFFFFFu;
}

std::string hex8(uint32_t v) {
    char buf[9];
    std::snprintf(buf, sizeof buf, "%08x", v);
    return buf;
}

struct Tensor {
    std::vector<int64_t> shape;
    const float* data = nullptr;
    int64_t count = 0;
};

std::string shape_str(const std::vector<int64_t>& s) {
    std::string r = "(";
    for (size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
    return r + (s.size() == 1 ? ",)" : ")");
}

enum Kind { EMB, ONEHOT, DENSE, DROPOUT, LAST, REC };

// The weights start on a cache line (as the Python layers' do): the kernels that read them
// where they lie (the batch-1 products beyond the L2, the input projection's rows of W_ih)
// then load whole lines, not two halves of neighbouring lines a vector.
template <class T> struct LineAlloc {
    using value_type = T;
    LineAlloc() = default;
    template <class U> LineAlloc(const LineAlloc<U>&) {}
    T* allocate(size_t n) {
        const size_t bytes = (n * sizeof(T) + 63) / 64 * 64;
        void* p = std::aligned_alloc(64, bytes ? bytes : 64);
        if (!p) throw std::bad_alloc();
        return static_cast<T*>(p);
    }
    void deallocate(T* p, size_t) { std::free(p); }
    template <class U> bool operator==(const LineAlloc<U>&) const { return true; }
    template <class U> bool operator!=(const LineAlloc<U>&) const { return false; }
};
using Weights = std::vector<float, LineAlloc<float>>;

struct Block {
    Kind kind;
    std::string type;
    int64_t in = 0, out = 0;      // features in and out (EMB/ONEHOT: vocabulary in)
    int act = 0;                  // Dense: 0 none, 1 tanh, 2 relu, 3 sigmoid
    bool bias = true;
    Weights W, b;
    LayerSpec spec;
    std::vector<Weights> params;
    std::vector<DirParams<float>> dp;
    // predict: the recurrent weights packed at the first call and kept (they never change)
    std::shared_ptr<PackedWeights> seq_packed = std::make_shared<PackedWeights>(true);
    // streaming: the weights packed once at load for the fused step kernels (StepPacks)
    std::shared_ptr<const StepPacks<float>> step_packs;
};

void pack_for_steps(Block& b) {
    if (!b.spec.bidirectional) b.step_packs = std::make_shared<const StepPacks<float>>(b.spec, b.dp);
}

}  // namespace

struct Model::Impl {
    std::vector<Block> blocks;
    int64_t input_size = 0, output_size = 0;
    bool tokens = false, m2o = false, stream = true;
    std::string desc;
    Precision precision = Precision::Float32;   // of the recurrent weights
};

namespace {

[[noreturn]] void bad(const std::string& name, const std::string& msg) {
    throw Error(name + ": not a loadable rnncore model: " + msg);
}

const json::Value& need(const json::Value& o, const char* key, const std::string& name, const std::string& where) {
    const json::Value* v = o.get(key);
    if (!v) bad(name, where + ": missing '" + key + "'");
    return *v;
}
int64_t need_int(const json::Value& o, const char* key, const std::string& name, const std::string& where,
                 int64_t lo, int64_t hi) {
    const json::Value& v = need(o, key, name, where);
    if (v.type != json::Value::NUMBER || !v.is_int || v.i < lo || v.i > hi)
        bad(name, where + ": '" + key + "' must be an integer in [" + std::to_string(lo) + ", " + std::to_string(hi) + "]");
    return v.i;
}
bool opt_bool(const json::Value& o, const char* key, bool dflt, const std::string& name, const std::string& where) {
    const json::Value* v = o.get(key);
    if (!v) return dflt;
    if (v->type != json::Value::BOOL) bad(name, where + ": '" + key + "' must be true or false");
    return v->b;
}
void need_f32(const json::Value& o, const std::string& name, const std::string& where) {
    const json::Value* v = o.get("dtype");
    if (v && (v->type != json::Value::STRING || v->str != "float32"))
        throw Error(name + ": " + where + " is " + (v->type == json::Value::STRING ? v->str : "?") +
                    "; the C++ API runs float32 models (save a float32 copy from Python)");
}

Block recurrent_block(const std::string& type, const json::Value& c, const std::string& name, const std::string& where) {
    Block b;
    b.kind = REC;
    b.type = type;
    need_f32(c, name, where);
    LayerSpec& s = b.spec;
    s.input_size = need_int(c, "input_size", name, where, 1, 1 << 24);
    s.hidden_size = need_int(c, "hidden_size", name, where, 1, 1 << 24);
    s.num_layers = need_int(c, "num_layers", name, where, 1, 4096);
    s.bias = opt_bool(c, "bias", true, name, where);
    s.bidirectional = opt_bool(c, "bidirectional", false, name, where);
    if (type == "RNN") {
        const json::Value* nl = c.get("nonlinearity");
        const std::string v = nl && nl->type == json::Value::STRING ? nl->str : "tanh";
        if (v != "tanh" && v != "relu") bad(name, where + ": unknown nonlinearity '" + v + "'");
        s.cell = v == "tanh" ? CellType::RNN_TANH : CellType::RNN_RELU;
    } else if (type == "LSTM") {
        s.cell = CellType::LSTM;
        s.proj_size = c.get("proj_size") ? need_int(c, "proj_size", name, where, 0, 1 << 24) : 0;
        s.peephole = opt_bool(c, "peephole", false, name, where);
        s.coupled_gates = opt_bool(c, "coupled_gates", false, name, where);
    } else {
        s.cell = CellType::GRU;
        s.linear_before_reset = opt_bool(c, "linear_before_reset", true, name, where);
    }
    try {
        s.validate();
    } catch (const std::invalid_argument& e) {
        bad(name, where + ": " + e.what());
    }
    const double count = (double)s.gates() * s.hidden_size * (s.input_size + s.hidden_size) * s.num_layers * s.dirs();
    if (count > 2147483648.0) bad(name, where + ": too many parameters");
    b.in = s.input_size;
    b.out = s.out_size() * s.dirs();
    return b;
}

void take(std::map<std::string, Tensor>& tensors, const std::string& key, const std::vector<int64_t>& shape,
          Weights* dst, const std::string& name) {
    auto it = tensors.find(key);
    if (it == tensors.end()) bad(name, "tensor '" + key + "' is missing");
    if (it->second.shape != shape)
        bad(name, "tensor '" + key + "' has shape " + shape_str(it->second.shape) + ", expected " + shape_str(shape));
    dst->resize((size_t)it->second.count);
    if (it->second.count) std::memcpy(dst->data(), it->second.data, sizeof(float) * (size_t)it->second.count);
    tensors.erase(it);
}

void take_recurrent(Block& b, std::map<std::string, Tensor>& tensors, const std::string& prefix, const std::string& name) {
    const auto info = param_info(b.spec);
    b.params.resize(info.size());
    b.dp.assign(b.spec.num_layers * b.spec.dirs(), DirParams<float>{});
    for (size_t i = 0; i < info.size(); ++i) {
        take(tensors, prefix + info[i].name, info[i].shape, &b.params[i], name);
        DirParams<float>& p = b.dp[info[i].layer * b.spec.dirs() + info[i].dir];
        const float* ptr = b.params[i].data();
        set_param(p, info[i].kind, ptr);
    }
}

std::shared_ptr<Model::Impl> decode(const std::string& blob, const std::string& name) {
    const size_t n = blob.size();
    if (n < 8) bad(name, "file is " + std::to_string(n) + " bytes, too short for a safetensors header (truncated?)");
    uint64_t hlen = 0;
    for (int k = 7; k >= 0; --k) hlen = (hlen << 8) | (unsigned char)blob[k];
    if (hlen > MAX_HEADER) bad(name, "header length " + std::to_string(hlen) + " exceeds the limit (corrupted?)");
    if (8 + hlen > n) bad(name, "header length " + std::to_string(hlen) + " runs past the end of the file (truncated?)");
    json::Value header;
    try {
        header = json::Parser(blob.data() + 8, (size_t)hlen).parse();
    } catch (const std::invalid_argument& e) {
        bad(name, std::string("header is not valid JSON (") + e.what() + ")");
    }
    if (header.type != json::Value::OBJECT) bad(name, "header is not a JSON object");
    const json::Value* meta = header.get("__metadata__");
    if (!meta || meta->type != json::Value::OBJECT) bad(name, "missing or malformed __metadata__");
    std::map<std::string, std::string> md;
    for (const auto& kv : meta->obj) {
        if (kv.second.type != json::Value::STRING) bad(name, "metadata values must be strings");
        md[kv.first] = kv.second.str;
    }
    if (md["format"] != "rnncore") bad(name, "format is '" + md["format"] + "', expected 'rnncore'");
    const std::string& ver = md["format_version"];
    if (ver.empty() || ver.size() > 9 || ver.find_first_not_of("0123456789") != std::string::npos)
        bad(name, "format_version '" + ver + "' is not an integer");
    const int version = std::stoi(ver);
    if (version > FORMAT_VERSION)
        bad(name, "format version " + ver + " was written by a newer rnncore; this one reads version 1");
    if (version < 1) bad(name, "format version " + ver + " is invalid");
    {
        std::string text;
        for (const auto& kv : md)       // std::map: keys sorted, as the writer sorts them
            if (kv.first != "meta_crc32") text += kv.first + "=" + kv.second + "\n";
#ifndef FUZZING_BUILD_MODE_UNSAFE_FOR_PRODUCTION   // the fuzzer skips checksums to reach what follows
        if (md["meta_crc32"] != hex8(crc32((const unsigned char*)text.data(), text.size())))
            bad(name, "metadata checksum mismatch (the header is corrupted)");
#endif
    }
    const unsigned char* data = (const unsigned char*)blob.data() + 8 + hlen;
    const uint64_t dlen = n - 8 - hlen;
#ifndef FUZZING_BUILD_MODE_UNSAFE_FOR_PRODUCTION
    if (md["data_crc32"] != hex8(crc32(data, (size_t)dlen)))
        bad(name, "data checksum mismatch (the file is corrupted or truncated)");
#endif
    std::map<std::string, Tensor> tensors;
    std::vector<std::pair<uint64_t, uint64_t>> spans;
    for (const auto& kv : header.obj) {
        if (kv.first == "__metadata__") continue;
        const json::Value& e = kv.second;
        const std::string where = "tensor '" + kv.first + "'";
        if (e.type != json::Value::OBJECT) bad(name, where + ": malformed entry");
        const json::Value* dt = e.get("dtype");
        if (!dt || dt->type != json::Value::STRING) bad(name, where + ": missing dtype");
        if (dt->str == "F64") throw Error(name + ": " + where + " is float64; the C++ API runs float32 models");
        if (dt->str != "F32") bad(name, where + ": dtype '" + dt->str + "' is not F32");
        const json::Value* sh = e.get("shape");
        const json::Value* off = e.get("data_offsets");
        if (!sh || sh->type != json::Value::ARRAY || sh->arr.size() > 8) bad(name, where + ": invalid shape");
        Tensor t;
        uint64_t count = 1;
        for (const auto& d : sh->arr) {
            if (d.type != json::Value::NUMBER || !d.is_int || d.i < 0 || d.i > (int64_t(1) << 40))
                bad(name, where + ": invalid shape");
            t.shape.push_back(d.i);
            count *= (uint64_t)d.i;
            if (count > (uint64_t(1) << 40)) bad(name, where + ": invalid shape");
        }
        if (!off || off->type != json::Value::ARRAY || off->arr.size() != 2) bad(name, where + ": invalid data_offsets");
        for (const auto& d : off->arr)
            if (d.type != json::Value::NUMBER || !d.is_int || d.i < 0) bad(name, where + ": invalid data_offsets");
        const uint64_t b0 = (uint64_t)off->arr[0].i, b1 = (uint64_t)off->arr[1].i;
        if (b0 > b1 || b1 > dlen || b1 - b0 != count * 4 || (b0 % 4) != 0)
            bad(name, where + ": data_offsets do not fit its shape and the data section");
        t.count = (int64_t)count;
        t.data = reinterpret_cast<const float*>(data + b0);
        spans.emplace_back(b0, b1);
        if (!tensors.emplace(kv.first, t).second) bad(name, where + ": duplicate name");
    }
    std::sort(spans.begin(), spans.end());
    uint64_t pos = 0;
    for (const auto& s : spans) {
        if (s.first != pos) bad(name, "tensor data overlaps or leaves gaps");
        pos = s.second;
    }
    if (pos != dlen) bad(name, "data section is not covered exactly by the tensors");
    // The data section may be unaligned for float: take() copies it out with memcpy.

    json::Value cfg;
    try {
        cfg = json::parse(md["config"]);
    } catch (const std::invalid_argument& e) {
        bad(name, std::string("config is not valid JSON (") + e.what() + ")");
    }
    auto impl = std::make_shared<Model::Impl>();
    const std::string kind = md["model"];
    std::ostringstream desc;
    if (kind == "RNN" || kind == "LSTM" || kind == "GRU") {
        Block b = recurrent_block(kind, cfg, name, "config");
        take_recurrent(b, tensors, "", name);
        pack_for_steps(b);
        impl->blocks.push_back(std::move(b));
    } else if (kind == "Sequential") {
        const json::Value* bl = cfg.get("blocks");
        if (!bl || bl->type != json::Value::ARRAY || bl->arr.empty()) bad(name, "config: missing blocks");
        for (size_t i = 0; i < bl->arr.size(); ++i) {
            const json::Value& e = bl->arr[i];
            const std::string where = "block " + std::to_string(i);
            const json::Value* ty = e.get("type");
            const json::Value* c = e.get("config");
            if (!ty || ty->type != json::Value::STRING || !c || c->type != json::Value::OBJECT)
                bad(name, where + ": malformed");
            const std::string prefix = std::to_string(i) + ".";
            Block b;
            b.type = ty->str;
            if (ty->str == "RNN" || ty->str == "LSTM" || ty->str == "GRU") {
                b = recurrent_block(ty->str, *c, name, where);
                take_recurrent(b, tensors, prefix, name);
                pack_for_steps(b);
            } else if (ty->str == "Embedding") {
                need_f32(*c, name, where);
                b.kind = EMB;
                b.in = need_int(*c, "num_embeddings", name, where, 1, int64_t(1) << 31);
                b.out = need_int(*c, "embedding_dim", name, where, 1, int64_t(1) << 24);
                take(tensors, prefix + "weight", {b.in, b.out}, &b.W, name);
            } else if (ty->str == "OneHot") {
                need_f32(*c, name, where);
                b.kind = ONEHOT;
                b.in = b.out = need_int(*c, "num_classes", name, where, 1, int64_t(1) << 24);
            } else if (ty->str == "Dense") {
                need_f32(*c, name, where);
                b.kind = DENSE;
                b.in = need_int(*c, "in_features", name, where, 1, int64_t(1) << 24);
                b.out = need_int(*c, "out_features", name, where, 1, int64_t(1) << 24);
                b.bias = opt_bool(*c, "bias", true, name, where);
                const json::Value* a = c->get("activation");
                if (a && a->type == json::Value::STRING) {
                    b.act = a->str == "tanh" ? 1 : a->str == "relu" ? 2 : a->str == "sigmoid" ? 3 : -1;
                    if (b.act < 0) bad(name, where + ": unknown activation '" + a->str + "'");
                } else if (a && a->type != json::Value::NUL) {
                    bad(name, where + ": invalid activation");
                }
                take(tensors, prefix + "weight", {b.out, b.in}, &b.W, name);
                if (b.bias) take(tensors, prefix + "bias", {b.out}, &b.b, name);
            } else if (ty->str == "Dropout") {
                b.kind = DROPOUT;
            } else if (ty->str == "LastStep") {
                b.kind = LAST;
            } else {
                throw Error(name + ": block " + std::to_string(i) + " (" + ty->str +
                            ") is not supported by the C++ API");
            }
            impl->blocks.push_back(std::move(b));
        }
    } else {
        throw Error(name + ": a " + kind + " model is not supported by the C++ API "
                    "(Sequential models and RNN/LSTM/GRU layers are)");
    }
    if (!tensors.empty()) bad(name, "unexpected tensor '" + tensors.begin()->first + "'");
    // check that the blocks chain
    int64_t width = 0;
    bool seq = true;
    for (size_t i = 0; i < impl->blocks.size(); ++i) {
        Block& b = impl->blocks[i];
        const std::string where = "block " + std::to_string(i) + " (" + b.type + ")";
        if (b.kind == EMB || b.kind == ONEHOT) {
            if (i != 0) bad(name, where + ": token blocks must come first");
            impl->tokens = true;
            impl->input_size = 1;
            width = b.out;
        } else if (b.kind == REC) {
            if (!seq) bad(name, where + ": a recurrent layer after LastStep");
            if (i == 0) { impl->input_size = b.in; width = b.in; }
            if (width != b.in) bad(name, where + ": expects " + std::to_string(b.in) + " features, gets " + std::to_string(width));
            width = b.out;
            if (b.spec.bidirectional) impl->stream = false;
        } else if (b.kind == DENSE) {
            if (i == 0) { impl->input_size = b.in; width = b.in; }
            if (width != b.in) bad(name, where + ": expects " + std::to_string(b.in) + " features, gets " + std::to_string(width));
            width = b.out;
        } else if (b.kind == LAST) {
            if (i == 0) bad(name, where + ": LastStep cannot come first");
            seq = false;
            impl->m2o = true;
        } else if (i == 0) {
            bad(name, where + ": the first block must be Embedding, OneHot, a recurrent layer or Dense");
        }
        desc << (i ? " -> " : "") << b.type;
    }
    impl->output_size = width;
    impl->desc = desc.str();
    return impl;
}

void dense(const Block& b, const float* x, int64_t rows, float* y) {
    gemm<float>(false, true, rows, b.out, b.in, 1.0f, x, b.in, b.W.data(), b.in, 0.0f, y, b.out);
    for (int64_t r = 0; r < rows; ++r) {
        float* yr = y + r * b.out;
        for (int64_t k = 0; k < b.out; ++k) {
            float v = yr[k] + (b.bias ? b.b[k] : 0.0f);
            if (b.act == 1) v = std::tanh(v);
            else if (b.act == 2) v = v > 0 ? v : 0.0f;
            else if (b.act == 3) v = 1.0f / (1.0f + std::exp(-v));
            yr[k] = v;
        }
    }
}

void tokens(const Block& b, const float* x, int64_t rows, float* y) {
    for (int64_t r = 0; r < rows; ++r) {
        const float v = x[r];
        if (!(v >= 0.0f) || v >= (float)b.in || v != std::floor(v))
            throw Error("x: expected token ids in [0, " + std::to_string(b.in - 1) + "], got " + std::to_string(v));
        const int64_t id = (int64_t)v;
        float* yr = y + r * b.out;
        if (b.kind == EMB) std::memcpy(yr, b.W.data() + id * b.out, sizeof(float) * b.out);
        else { std::fill(yr, yr + b.out, 0.0f); yr[id] = 1.0f; }
    }
}

}  // namespace

Model::Model() = default;
Model::~Model() = default;
Model::Model(Model&&) noexcept = default;
Model& Model::operator=(Model&&) noexcept = default;

Model Model::from_bytes(const std::string& bytes, const std::string& name, Precision recurrent_precision) {
    if (recurrent_precision != Precision::Float32 && recurrent_precision != Precision::BFloat16)
        throw Error("recurrent_precision: expected Float32 or BFloat16, got " +
                    std::to_string((int)recurrent_precision));
    Model m;
    auto impl = decode(bytes, name);
    impl->precision = recurrent_precision;
    m.impl_ = std::move(impl);
    return m;
}

Model Model::load(const std::string& path, Precision recurrent_precision) {
    std::ifstream f(path, std::ios::binary);
    if (!f) throw Error(path + ": cannot open the file");
    f.seekg(0, std::ios::end);
    const std::streamoff size = f.tellg();
    if (size < 0) throw Error(path + ": cannot read the file");
    if ((uint64_t)size > (uint64_t(1) << 36)) throw Error(path + ": file too large");
    f.seekg(0, std::ios::beg);
    std::string blob((size_t)size, '\0');
    if (size > 0 && !f.read(&blob[0], size)) throw Error(path + ": cannot read the file");
    return from_bytes(blob, path, recurrent_precision);
}

static const Model::Impl& need_impl(const std::shared_ptr<const Model::Impl>& p) {
    if (!p) throw Error("model: not loaded");
    return *p;
}

int64_t Model::input_size() const { return need_impl(impl_).input_size; }
int64_t Model::output_size() const { return need_impl(impl_).output_size; }
bool Model::token_input() const { return need_impl(impl_).tokens; }
bool Model::many_to_one() const { return need_impl(impl_).m2o; }
bool Model::streamable() const { return need_impl(impl_).stream; }
std::string Model::summary() const { return need_impl(impl_).desc; }
Precision Model::recurrent_precision() const { return need_impl(impl_).precision; }

int64_t Model::predict_size(int64_t T, int64_t B) const {
    const Impl& m = need_impl(impl_);
    return (m.m2o ? B : T * B) * m.output_size;
}

void Model::predict(const float* x, int64_t T, int64_t B, float* y, const int64_t* lengths) const {
    const Impl& m = need_impl(impl_);
    if (!x || !y) throw Error("predict: null buffer");
    if (T < 1 || B < 1 || T > (int64_t(1) << 31) || B > (int64_t(1) << 31))
        throw Error("predict: expected T >= 1 and B >= 1, got T=" + std::to_string(T) + ", B=" + std::to_string(B));
    if (lengths)
        for (int64_t b = 0; b < B; ++b)
            if (lengths[b] < 1 || lengths[b] > T)
                throw Error("lengths: expected values in [1, " + std::to_string(T) + "], got " + std::to_string(lengths[b]));
    std::vector<float> cur(x, x + T * B * m.input_size), nxt;
    int64_t rows = T * B;
    for (const Block& b : m.blocks) {
        switch (b.kind) {
            case EMB: case ONEHOT:
                nxt.resize(rows * b.out);
                tokens(b, cur.data(), rows, nxt.data());
                cur.swap(nxt);
                break;
            case REC: {
                const LayerSpec& s = b.spec;
                nxt.resize(T * B * b.out);
                std::vector<float> hn(s.num_layers * s.dirs() * B * s.out_size()), cn(s.is_lstm() ? s.num_layers * s.dirs() * B * s.hidden_size : 1);
                ForwardArgs<float> a;
                a.steps = T; a.batch = B; a.x = cur.data(); a.lengths = lengths;
                a.packed = b.seq_packed.get();
                a.recurrent_precision = m.precision;
                ForwardOut<float> o;
                o.y = nxt.data(); o.h_n = hn.data(); o.c_n = s.is_lstm() ? cn.data() : nullptr;
                stack_forward<float>(s, b.dp, a, o, nullptr);
                cur.swap(nxt);
                break;
            }
            case DENSE:
                nxt.resize(rows * b.out);
                dense(b, cur.data(), rows, nxt.data());
                cur.swap(nxt);
                break;
            case LAST: {
                const int64_t F = (int64_t)cur.size() / rows;
                nxt.resize(B * F);
                for (int64_t bb = 0; bb < B; ++bb) {
                    const int64_t t = lengths ? lengths[bb] - 1 : T - 1;
                    std::memcpy(nxt.data() + bb * F, cur.data() + (t * B + bb) * F, sizeof(float) * F);
                }
                cur.swap(nxt);
                rows = B;
                break;
            }
            case DROPOUT: break;
        }
    }
    std::memcpy(y, cur.data(), sizeof(float) * cur.size());
}

void Model::State::reset() {
    for (auto& v : h) std::fill(v.begin(), v.end(), 0.0f);
    for (auto& v : c) std::fill(v.begin(), v.end(), 0.0f);
}

Model::State Model::new_state(int64_t B) const {
    const Impl& m = need_impl(impl_);
    if (!m.stream) throw Error("state: a model with a bidirectional layer cannot run step by step");
    if (B < 1 || B > (int64_t(1) << 24)) throw Error("state: expected a batch of at least 1, got " + std::to_string(B));
    State s;
    s.batch = B;
    for (const Block& b : m.blocks) {
        if (b.kind != REC) continue;
        s.h.emplace_back(b.spec.num_layers * B * b.spec.out_size(), 0.0f);
        s.c.emplace_back(b.spec.is_lstm() ? b.spec.num_layers * B * b.spec.hidden_size : 0, 0.0f);
    }
    return s;
}

void Model::step(const float* x, State& st, float* y) const {
    const Impl& m = need_impl(impl_);
    if (!x || !y) throw Error("step: null buffer");
    if (!m.stream) throw Error("step: a model with a bidirectional layer cannot run step by step");
    const int64_t B = st.batch;
    size_t r = 0;
    for (const Block& b : m.blocks) {
        if (b.kind != REC) continue;
        if (r >= st.h.size() || st.h[r].size() != (size_t)(b.spec.num_layers * B * b.spec.out_size()))
            throw Error("state: it was made by another model");
        ++r;
    }
    if (B < 1 || r != st.h.size()) throw Error("state: it was made by another model");
    thread_local std::vector<float> cur, nxt;
    cur.assign(x, x + B * m.input_size);
    r = 0;
    for (const Block& b : m.blocks) {
        switch (b.kind) {
            case EMB: case ONEHOT:
                nxt.resize(B * b.out);
                tokens(b, cur.data(), B, nxt.data());
                cur.swap(nxt);
                break;
            case REC: {
                const LayerSpec& s = b.spec;
                float* c = s.is_lstm() ? st.c[r].data() : nullptr;
                nxt.resize(B * s.out_size());
                if (m.precision == Precision::BFloat16)   // (the fused step kernels are float32)
                    stack_step<float>(s, b.dp, B, cur.data(), st.h[r].data(), c, nxt.data(), m.precision,
                                      b.seq_packed.get());
                else   // the fused blocks, or from four batch rows where a fused pass takes
                       // fewer the row-major step (the kernels' step_packed decides)
                    stack_step<float>(s, b.dp, B, cur.data(), st.h[r].data(), c, nxt.data(), *b.step_packs);
                ++r;
                cur.swap(nxt);
                break;
            }
            case DENSE:
                nxt.resize(B * b.out);
                dense(b, cur.data(), B, nxt.data());
                cur.swap(nxt);
                break;
            case LAST: case DROPOUT: break;
        }
    }
    std::memcpy(y, cur.data(), sizeof(float) * B * m.output_size);
}

}  // namespace rnncore
