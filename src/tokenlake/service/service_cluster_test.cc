// Cluster tests: written in the next commit.
#include "gtest/gtest.h"
