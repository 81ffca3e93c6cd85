// Prometheus text exposition (format 0.0.4) for the service: a latency Histogram and a small
// writer that emits HELP/TYPE headers and samples with labels.
//
// Thread-safety: Histogram is thread-safe. PrometheusWriter is not (one per scrape).
#ifndef TOKENLAKE_SERVICE_METRICS_H_
#define TOKENLAKE_SERVICE_METRICS_H_

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"

namespace tokenlake::service {

// A cumulative histogram with fixed upper bounds (plus +Inf).
class Histogram {
 public:
  // `upper_bounds` ascending; TOKENLAKE_CHECKs that they are (a programmer error).
  explicit Histogram(std::vector<double> upper_bounds);

  void Observe(double value);

  struct Snapshot {
    std::vector<double> upper_bounds;
    std::vector<int64_t> cumulative_counts;  // one per bound, then +Inf (== count)
    int64_t count = 0;
    double sum = 0;
  };
  Snapshot Read() const;

  // The q-quantile (0 <= q <= 1) estimated as the upper bound of the bucket that holds it
  // (+Inf bucket -> the largest observed value). 0 when empty.
  double Quantile(double q) const;

 private:
  const std::vector<double> bounds_;
  mutable absl::Mutex mu_;
  std::vector<int64_t> counts_ ABSL_GUARDED_BY(mu_);  // per bucket, non-cumulative, +Inf last
  int64_t count_ ABSL_GUARDED_BY(mu_) = 0;
  double sum_ ABSL_GUARDED_BY(mu_) = 0;
  double max_ ABSL_GUARDED_BY(mu_) = 0;
};

using Labels = std::vector<std::pair<std::string, std::string>>;

class PrometheusWriter {
 public:
  // Starts a metric family (HELP and TYPE lines). type: "counter", "gauge" or "histogram".
  void Family(absl::string_view name, absl::string_view type, absl::string_view help);
  // One sample line: name{labels} value.
  void Sample(absl::string_view name, const Labels& labels, double value);
  // The _bucket/_sum/_count lines of a histogram.
  void HistogramSamples(absl::string_view name, const Labels& labels,
                        const Histogram::Snapshot& snapshot);
  const std::string& text() const { return out_; }

 private:
  std::string out_;
};

// Escapes a label value (backslash, double quote, newline).
std::string EscapeLabelValue(absl::string_view value);

}  // namespace tokenlake::service

#endif  // TOKENLAKE_SERVICE_METRICS_H_
