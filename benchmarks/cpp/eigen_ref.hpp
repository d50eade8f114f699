#pragma once
// Microseconds per step (best of `reps` runs of `n` steps) of the Eigen fixed-size baseline in
// eigen_ref.cpp; -1 for a size it was not compiled for (LSTM/GRU at I=32 H=64, I=128 H=256).
double eigen_step_us(bool lstm, int in, int hid, int warm, int n, int reps);
