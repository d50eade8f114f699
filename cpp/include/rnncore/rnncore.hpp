// rnncore: umbrella header for the C++ API.
#pragma once
#include "rnncore/layer.hpp"
#include "rnncore/runtime.hpp"
