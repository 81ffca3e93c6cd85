// A small SVG plotting helper for the simulator's report: bar charts, line charts (CDFs, time
// series) and heatmaps, as standalone SVG documents. No external tools.
//
// Thread-safety: pure functions.
#ifndef TOKENLAKE_SIM_SVG_H_
#define TOKENLAKE_SIM_SVG_H_

#include <string>
#include <vector>

namespace tokenlake::sim::svg {

struct Bar {
  std::string label;
  double value = 0;
};

// Vertical bars with their values printed on top. `unit` is appended to the axis title.
std::string BarChart(const std::string& title, const std::string& y_label,
                     const std::vector<Bar>& bars);

struct Series {
  std::string name;
  std::vector<double> x, y;  // same length
};

struct LineOptions {
  std::string x_label, y_label;
  bool log_x = false;
  // Axis ranges; when min >= max, taken from the data.
  double x_min = 0, x_max = 0, y_min = 0, y_max = 0;
};

std::string LineChart(const std::string& title, const std::vector<Series>& series,
                      const LineOptions& options);

// rows x cols values in [0, 1] as a white-to-dark heatmap; row r labelled row_labels[r].
std::string Heatmap(const std::string& title, const std::vector<std::vector<double>>& rows,
                    const std::vector<std::string>& row_labels, const std::string& x_label,
                    double x_span);

// The colour of series i (a fixed, colour-blind-safe palette).
std::string Colour(size_t i);

}  // namespace tokenlake::sim::svg

#endif  // TOKENLAKE_SIM_SVG_H_
