// A small, strict JSON reader for the saved-model header: objects, arrays, strings (with
// escapes, \u included), numbers, true/false/null. Depth and size are bounded; any error
// throws std::invalid_argument with the byte offset. Not a general-purpose library.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace rnncore {
namespace json {

struct Value {
    enum Type { NUL, BOOL, NUMBER, STRING, ARRAY, OBJECT } type = NUL;
    bool b = false;
    double num = 0;
    bool is_int = false;
    int64_t i = 0;
    std::string str;
    std::vector<Value> arr;
    std::vector<std::pair<std::string, Value>> obj;

    const Value* get(const std::string& key) const {
        if (type != OBJECT) return nullptr;
        for (const auto& kv : obj)
            if (kv.first == key) return &kv.second;
        return nullptr;
    }
};

class Parser {
  public:
    Parser(const char* p, size_t n) : s_(p), n_(n) {}
    Value parse() {
        Value v = value(0);
        ws();
        if (pos_ != n_) fail("trailing characters");
        return v;
    }

  private:
    const char* s_;
    size_t n_, pos_ = 0;

    [[noreturn]] void fail(const std::string& what) const {
        throw std::invalid_argument("invalid JSON at byte " + std::to_string(pos_) + ": " + what);
    }
    void ws() {
        while (pos_ < n_ && (s_[pos_] == ' ' || s_[pos_] == '\t' || s_[pos_] == '\n' || s_[pos_] == '\r')) ++pos_;
    }
    bool eat(char c) {
        ws();
        if (pos_ < n_ && s_[pos_] == c) { ++pos_; return true; }
        return false;
    }
    void expect(const char* lit) {
        for (const char* q = lit; *q; ++q, ++pos_)
            if (pos_ >= n_ || s_[pos_] != *q) fail(std::string("expected ") + lit);
    }
    Value value(int depth) {
        if (depth > 64) fail("nesting too deep");
        ws();
        if (pos_ >= n_) fail("unexpected end");
        Value v;
        const char c = s_[pos_];
        if (c == '{') {
            ++pos_;
            v.type = Value::OBJECT;
            if (eat('}')) return v;
            do {
                ws();
                if (pos_ >= n_ || s_[pos_] != '"') fail("expected a key");
                std::string k = string();
                if (!eat(':')) fail("expected ':'");
                v.obj.emplace_back(std::move(k), value(depth + 1));
            } while (eat(','));
            if (!eat('}')) fail("expected '}'");
        } else if (c == '[') {
            ++pos_;
            v.type = Value::ARRAY;
            if (eat(']')) return v;
            do v.arr.push_back(value(depth + 1));
            while (eat(','));
            if (!eat(']')) fail("expected ']'");
        } else if (c == '"') {
            v.type = Value::STRING;
            v.str = string();
        } else if (c == 't') {
            expect("true"); v.type = Value::BOOL; v.b = true;
        } else if (c == 'f') {
            expect("false"); v.type = Value::BOOL; v.b = false;
        } else if (c == 'n') {
            expect("null");
        } else {
            number(v);
        }
        return v;
    }
    void number(Value& v) {
        const size_t start = pos_;
        if (pos_ < n_ && s_[pos_] == '-') ++pos_;
        bool digits = false, frac = false;
        while (pos_ < n_ && s_[pos_] >= '0' && s_[pos_] <= '9') { ++pos_; digits = true; }
        if (pos_ < n_ && s_[pos_] == '.') {
            frac = true; ++pos_;
            while (pos_ < n_ && s_[pos_] >= '0' && s_[pos_] <= '9') ++pos_;
        }
        if (pos_ < n_ && (s_[pos_] == 'e' || s_[pos_] == 'E')) {
            frac = true; ++pos_;
            if (pos_ < n_ && (s_[pos_] == '+' || s_[pos_] == '-')) ++pos_;
            while (pos_ < n_ && s_[pos_] >= '0' && s_[pos_] <= '9') ++pos_;
        }
        if (!digits || pos_ - start > 64) fail("invalid number");
        const std::string t(s_ + start, pos_ - start);
        v.type = Value::NUMBER;
        v.num = std::strtod(t.c_str(), nullptr);
        if (!frac && t.size() <= 18) { v.is_int = true; v.i = std::strtoll(t.c_str(), nullptr, 10); }
    }
    static void utf8(std::string& out, uint32_t cp) {
        if (cp < 0x80) out += (char)cp;
        else if (cp < 0x800) { out += (char)(0xC0 | (cp >> 6)); out += (char)(0x80 | (cp & 0x3F)); }
        else if (cp < 0x10000) {
            out += (char)(0xE0 | (cp >> 12)); out += (char)(0x80 | ((cp >> 6) & 0x3F)); out += (char)(0x80 | (cp & 0x3F));
        } else {
            out += (char)(0xF0 | (cp >> 18)); out += (char)(0x80 | ((cp >> 12) & 0x3F));
            out += (char)(0x80 | ((cp >> 6) & 0x3F)); out += (char)(0x80 | (cp & 0x3F));
        }
    }
    uint32_t hex4() {
        if (pos_ + 4 > n_) fail("short \\u escape");
        uint32_t v = 0;
        for (int k = 0; k < 4; ++k) {
            const char c = s_[pos_++];
            v <<= 4;
            if (c >= '0' && c <= '9') v |= (uint32_t)(c - '0');
            else if (c >= 'a' && c <= 'f') v |= (uint32_t)(c - 'a' + 10);
            else if (c >= 'A' && c <= 'F') v |= (uint32_t)(c - 'A' + 10);
            else fail("bad \\u escape");
        }
        return v;
    }
    std::string string() {
        ++pos_;   // opening quote
        std::string out;
        while (true) {
            if (pos_ >= n_) fail("unterminated string");
            const unsigned char c = (unsigned char)s_[pos_++];
            if (c == '"') return out;
            if (c < 0x20) fail("control character in string");
            if (c >= 0x80) {                      // strict UTF-8: lead byte, then continuations
                const int extra = (c & 0xE0) == 0xC0 ? 1 : (c & 0xF0) == 0xE0 ? 2 : (c & 0xF8) == 0xF0 ? 3 : -1;
                if (extra < 0 || c == 0xC0 || c == 0xC1 || c > 0xF4) fail("invalid UTF-8");
                out += (char)c;
                for (int k = 0; k < extra; ++k) {
                    if (pos_ >= n_ || ((unsigned char)s_[pos_] & 0xC0) != 0x80) fail("invalid UTF-8");
                    out += s_[pos_++];
                }
                continue;
            }
            if (c != '\\') { out += (char)c; continue; }
            if (pos_ >= n_) fail("unterminated escape");
            const char e = s_[pos_++];
            switch (e) {
                case '"': out += '"'; break;
                case '\\': out += '\\'; break;
                case '/': out += '/'; break;
                case 'b': out += '\b'; break;
                case 'f': out += '\f'; break;
                case 'n': out += '\n'; break;
                case 'r': out += '\r'; break;
                case 't': out += '\t'; break;
                case 'u': {
                    uint32_t cp = hex4();
                    if (cp >= 0xD800 && cp <= 0xDBFF) {
                        if (pos_ + 2 > n_ || s_[pos_] != '\\' || s_[pos_ + 1] != 'u') fail("lone surrogate");
                        pos_ += 2;
                        const uint32_t lo = hex4();
                        if (lo < 0xDC00 || lo > 0xDFFF) fail("bad surrogate pair");
                        cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                    } else if (cp >= 0xDC00 && cp <= 0xDFFF) {
                        fail("lone surrogate");
                    }
                    utf8(out, cp);
                    break;
                }
                default: fail("bad escape");
            }
        }
    }
};

inline Value parse(const std::string& text) { return Parser(text.data(), text.size()).parse(); }

}  // namespace json
}  // namespace rnncore
