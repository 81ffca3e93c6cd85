#include "tokenlake/sim/svg.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "absl/strings/str_format.h"

namespace tokenlake::sim::svg {
namespace {

constexpr double kWidth = 640, kHeight = 400;
constexpr double kLeft = 70, kRight = 20, kTop = 40, kBottom = 60;

std::string Escape(const std::string& s) {
  std::string out;
  for (char c : s) {
    switch (c) {
      case '<':
        out += "&lt;";
        break;
      case '>':
        out += "&gt;";
        break;
      case '&':
        out += "&amp;";
        break;
      case '"':
        out += "&quot;";
        break;
      default:
        out += c;
    }
  }
  return out;
}

std::string Header(const std::string& title) {
  // Bold sans-serif glyphs average about 0.6 em: shrink a long title so that it fits the width.
  const double fit_px =
      (kWidth - 20) / (0.6 * static_cast<double>(std::max<size_t>(title.size(), 1)));
  const double font_px = std::clamp(fit_px, 8.0, 15.0);
  return absl::StrFormat(
      "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%.0f\" height=\"%.0f\" "
      "viewBox=\"0 0 %.0f %.0f\" font-family=\"sans-serif\" font-size=\"12\">\n"
      "<rect width=\"100%%\" height=\"100%%\" fill=\"white\"/>\n"
      "<text x=\"%.0f\" y=\"22\" text-anchor=\"middle\" font-size=\"%.1f\" "
      "font-weight=\"bold\">%s</text>\n",
      kWidth, kHeight, kWidth, kHeight, kWidth / 2, font_px, Escape(title));
}

// A "nice" step for about `n` ticks over [lo, hi].
double NiceStep(double lo, double hi, int n) {
  const double raw = (hi - lo) / n;
  if (!(raw > 0)) return 1;
  const double mag = std::pow(10, std::floor(std::log10(raw)));
  for (double m : {1.0, 2.0, 2.5, 5.0, 10.0}) {
    if (raw <= m * mag) return m * mag;
  }
  return 10 * mag;
}

std::string Fmt(double v) {
  if (v == 0) return "0";
  const double a = std::fabs(v);
  if (a >= 1e12) return absl::StrFormat("%.3gT", v / 1e12);
  if (a >= 1e9) return absl::StrFormat("%.3gG", v / 1e9);
  if (a >= 1e6) return absl::StrFormat("%.3gM", v / 1e6);
  if (a >= 1e4) return absl::StrFormat("%.3gk", v / 1e3);
  if (a >= 100) return absl::StrFormat("%.0f", v);
  return absl::StrFormat("%.3g", v);
}

std::string YAxis(double y0, double y1, const std::string& label, double (*)(double) = nullptr) {
  std::string s;
  const double plot_h = kHeight - kTop - kBottom;
  const double step = NiceStep(y0, y1, 5);
  for (double v = std::ceil(y0 / step) * step; v <= y1 + step * 1e-9; v += step) {
    const double y = kTop + plot_h * (1 - (v - y0) / (y1 - y0));
    s += absl::StrFormat(
        "<line x1=\"%.1f\" x2=\"%.1f\" y1=\"%.1f\" y2=\"%.1f\" stroke=\"#ddd\"/>\n"
        "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"end\">%s</text>\n",
        kLeft, kWidth - kRight, y, y, kLeft - 6, y + 4, Fmt(v));
  }
  s += absl::StrFormat(
      "<text transform=\"translate(16,%.1f) rotate(-90)\" text-anchor=\"middle\">%s</text>\n",
      kTop + plot_h / 2, Escape(label));
  s += absl::StrFormat("<line x1=\"%.1f\" x2=\"%.1f\" y1=\"%.1f\" y2=\"%.1f\" stroke=\"black\"/>\n",
                       kLeft, kLeft, kTop, kHeight - kBottom);
  return s;
}

}  // namespace

std::string Colour(size_t i) {
  static const char* kPalette[] = {"#0072B2", "#E69F00", "#009E73", "#D55E00",
                                   "#CC79A7", "#56B4E9", "#F0E442", "#000000"};
  return kPalette[i % 8];
}

std::string BarChart(const std::string& title, const std::string& y_label,
                     const std::vector<Bar>& bars) {
  std::string s = Header(title);
  double y1 = 0;
  for (const Bar& b : bars) {
    if (std::isfinite(b.value)) y1 = std::max(y1, b.value);
  }
  if (y1 <= 0) y1 = 1;
  y1 = std::ceil(y1 * 1.15 / NiceStep(0, y1 * 1.15, 5)) * NiceStep(0, y1 * 1.15, 5);
  s += YAxis(0, y1, y_label);
  const double plot_w = kWidth - kLeft - kRight, plot_h = kHeight - kTop - kBottom;
  const double slot = plot_w / std::max<size_t>(1, bars.size());
  for (size_t i = 0; i < bars.size(); ++i) {
    const double v = std::isfinite(bars[i].value) ? std::max(0.0, bars[i].value) : 0;
    const double h = plot_h * v / y1;
    const double x = kLeft + slot * i + slot * 0.2;
    s += absl::StrFormat(
        "<rect x=\"%.1f\" y=\"%.1f\" width=\"%.1f\" height=\"%.1f\" fill=\"%s\"/>\n"
        "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"middle\">%s</text>\n"
        "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"middle\">%s</text>\n",
        x, kTop + plot_h - h, slot * 0.6, h, Colour(i), x + slot * 0.3, kTop + plot_h - h - 5,
        Fmt(v), x + slot * 0.3, kHeight - kBottom + 18, Escape(bars[i].label));
  }
  s += absl::StrFormat("<line x1=\"%.1f\" x2=\"%.1f\" y1=\"%.1f\" y2=\"%.1f\" stroke=\"black\"/>\n",
                       kLeft, kWidth - kRight, kHeight - kBottom, kHeight - kBottom);
  return s + "</svg>\n";
}

std::string LineChart(const std::string& title, const std::vector<Series>& series,
                      const LineOptions& o) {
  std::string s = Header(title);
  double x0 = o.x_min, x1 = o.x_max, y0 = o.y_min, y1 = o.y_max;
  if (!(x0 < x1) || !(y0 < y1)) {
    double dx0 = std::numeric_limits<double>::infinity(), dx1 = -dx0, dy0 = dx0, dy1 = -dx0;
    for (const Series& sr : series) {
      for (size_t i = 0; i < sr.x.size(); ++i) {
        if (!std::isfinite(sr.x[i]) || !std::isfinite(sr.y[i])) continue;
        if (o.log_x && sr.x[i] <= 0) continue;
        dx0 = std::min(dx0, sr.x[i]), dx1 = std::max(dx1, sr.x[i]);
        dy0 = std::min(dy0, sr.y[i]), dy1 = std::max(dy1, sr.y[i]);
      }
    }
    if (!(x0 < x1)) x0 = dx0, x1 = dx1;
    if (!(y0 < y1)) y0 = std::min(0.0, dy0), y1 = dy1;
    if (!std::isfinite(x0) || !(x0 < x1)) x0 = o.log_x ? 1 : 0, x1 = x0 + 1;
    if (!std::isfinite(y0) || !(y0 < y1)) y0 = 0, y1 = 1;
  }
  const double plot_w = kWidth - kLeft - kRight - 120, plot_h = kHeight - kTop - kBottom;
  auto tx = [&](double x) {
    const double f = o.log_x ? (std::log10(x) - std::log10(x0)) / (std::log10(x1) - std::log10(x0))
                             : (x - x0) / (x1 - x0);
    return kLeft + plot_w * std::clamp(f, 0.0, 1.0);
  };
  auto ty = [&](double y) {
    return kTop + plot_h * (1 - std::clamp((y - y0) / (y1 - y0), 0.0, 1.0));
  };
  s += YAxis(y0, y1, o.y_label);
  // x ticks
  if (o.log_x) {
    for (double v = std::pow(10, std::floor(std::log10(x0))); v <= x1 * 1.0001; v *= 10) {
      if (v < x0) continue;
      s += absl::StrFormat("<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"middle\">%s</text>\n", tx(v),
                           kHeight - kBottom + 16, Fmt(v));
    }
  } else {
    const double step = NiceStep(x0, x1, 6);
    for (double v = std::ceil(x0 / step) * step; v <= x1 + step * 1e-9; v += step) {
      s += absl::StrFormat("<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"middle\">%s</text>\n", tx(v),
                           kHeight - kBottom + 16, Fmt(v));
    }
  }
  s += absl::StrFormat(
      "<line x1=\"%.1f\" x2=\"%.1f\" y1=\"%.1f\" y2=\"%.1f\" stroke=\"black\"/>\n"
      "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"middle\">%s</text>\n",
      kLeft, kLeft + plot_w, kHeight - kBottom, kHeight - kBottom, kLeft + plot_w / 2,
      kHeight - kBottom + 36, Escape(o.x_label));
  for (size_t k = 0; k < series.size(); ++k) {
    const Series& sr = series[k];
    std::string points;
    for (size_t i = 0; i < sr.x.size(); ++i) {
      if (!std::isfinite(sr.x[i]) || !std::isfinite(sr.y[i]) || (o.log_x && sr.x[i] <= 0)) continue;
      points += absl::StrFormat("%.1f,%.1f ", tx(sr.x[i]), ty(sr.y[i]));
    }
    s += absl::StrFormat(
        "<polyline fill=\"none\" stroke=\"%s\" stroke-width=\"2\" points=\"%s\"/>\n"
        "<line x1=\"%.1f\" x2=\"%.1f\" y1=\"%.1f\" y2=\"%.1f\" stroke=\"%s\" stroke-width=\"3\"/>\n"
        "<text x=\"%.1f\" y=\"%.1f\">%s</text>\n",
        Colour(k), points, kLeft + plot_w + 10, kLeft + plot_w + 28, kTop + 10 + 18.0 * k,
        kTop + 10 + 18.0 * k, Colour(k), kLeft + plot_w + 32, kTop + 14 + 18.0 * k,
        Escape(sr.name));
  }
  return s + "</svg>\n";
}

std::string Heatmap(const std::string& title, const std::vector<std::vector<double>>& rows,
                    const std::vector<std::string>& row_labels, const std::string& x_label,
                    double x_span) {
  std::string s = Header(title);
  const double plot_w = kWidth - kLeft - kRight, plot_h = kHeight - kTop - kBottom;
  const size_t n_rows = std::max<size_t>(1, rows.size());
  const double cell_h = plot_h / n_rows;
  for (size_t r = 0; r < rows.size(); ++r) {
    const size_t n_cols = std::max<size_t>(1, rows[r].size());
    const double cell_w = plot_w / n_cols;
    for (size_t c = 0; c < rows[r].size(); ++c) {
      const double v = std::clamp(rows[r][c], 0.0, 1.0);
      const int shade = static_cast<int>(255 - 200 * v);
      s += absl::StrFormat(
          "<rect x=\"%.2f\" y=\"%.2f\" width=\"%.2f\" height=\"%.2f\" fill=\"rgb(%d,%d,255)\"/>\n",
          kLeft + cell_w * c, kTop + cell_h * r, cell_w + 0.3, cell_h + 0.3, shade, shade);
    }
    if (r < row_labels.size() && (rows.size() <= 20 || r % 4 == 0)) {
      s += absl::StrFormat("<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"end\">%s</text>\n", kLeft - 6,
                           kTop + cell_h * r + cell_h / 2 + 4, Escape(row_labels[r]));
    }
  }
  const double step = NiceStep(0, x_span, 6);
  for (double v = 0; v <= x_span + step * 1e-9 && x_span > 0; v += step) {
    s += absl::StrFormat("<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"middle\">%s</text>\n",
                         kLeft + plot_w * v / x_span, kHeight - kBottom + 16, Fmt(v));
  }
  s += absl::StrFormat(
      "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"middle\">%s (shade: busy share 0..1)</text>\n",
      kLeft + plot_w / 2, kHeight - kBottom + 36, Escape(x_label));
  return s + "</svg>\n";
}

}  // namespace tokenlake::sim::svg
