//! PNG line charts shared by every command: a title, axis labels, linear or log y, and
//! named series with optional shaded bands (e.g. the spread over seeds).
//!
//! Text is drawn with DejaVu Sans embedded in the binary (assets/fonts), so a chart
//! looks the same on every machine and never needs a system font. Files are written
//! atomically: drawn to a temporary file in the target directory, then renamed.

use std::ops::Range;
use std::path::Path;
use std::sync::Once;

use anyhow::{anyhow, Context, Result};
use image::ImageEncoder;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

/// DejaVu Sans, embedded (license: assets/fonts/LICENSE-DejaVu.txt).
static FONT: &[u8] = include_bytes!("../../../assets/fonts/DejaVuSans.ttf");
const FAMILY: &str = "sans-serif";

fn register_font() -> Result<()> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = plotters::style::register_font(FAMILY, FontStyle::Normal, FONT)
            .map_err(|_| anyhow!("the embedded DejaVu Sans font could not be loaded"));
    });
    result
}

/// One line of a chart.
#[derive(Debug, Clone, Default)]
pub struct Series {
    /// Legend entry.
    pub name: String,
    /// `(x, y)` points, drawn in order. On a log-y chart, points with `y` at or below
    /// the floor are left out (the line stops there).
    pub points: Vec<(f64, f64)>,
    /// Optional shaded band `(x, lower, upper)`, e.g. the spread over seeds.
    pub band: Option<Vec<(f64, f64, f64)>>,
    /// Draw a dot on every point (useful with few points).
    pub markers: bool,
    /// Dashed line (e.g. a theory curve next to measurements).
    pub dashed: bool,
    /// Fixed RGB color instead of the palette's next one (e.g. gray for a reference
    /// line). Series with an empty name get no legend entry.
    pub color: Option<(u8, u8, u8)>,
}

impl Series {
    /// A plain line.
    pub fn new(name: impl Into<String>, points: Vec<(f64, f64)>) -> Series {
        Series { name: name.into(), points, ..Series::default() }
    }
    /// Adds a shaded band.
    pub fn with_band(mut self, band: Vec<(f64, f64, f64)>) -> Series {
        self.band = Some(band);
        self
    }
    /// Adds point markers.
    pub fn with_markers(mut self) -> Series {
        self.markers = true;
        self
    }
    /// Dashes the line.
    pub fn dashed(mut self) -> Series {
        self.dashed = true;
        self
    }
    /// Uses a fixed color.
    pub fn with_color(mut self, rgb: (u8, u8, u8)) -> Series {
        self.color = Some(rgb);
        self
    }
}

/// What to draw.
#[derive(Debug, Clone)]
pub struct ChartSpec {
    /// Title above the plot.
    pub title: String,
    /// Label of the x axis.
    pub x_label: String,
    /// Label of the y axis.
    pub y_label: String,
    /// Logarithmic y axis.
    pub log_y: bool,
    /// Log-y only: values at or below this are not drawn (the line stops there);
    /// default 1e-300, i.e. every positive value.
    pub y_floor: f64,
    /// The lines, drawn in order with a fixed palette.
    pub series: Vec<Series>,
    /// Image size in pixels (default 900 x 600).
    pub size: (u32, u32),
    /// Corner of the legend (default upper right).
    pub legend: Legend,
}

/// Where the legend box goes.
#[allow(dead_code)] // shared API: not every command uses every corner
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Legend {
    /// Upper right corner of the plot area.
    #[default]
    UpperRight,
    /// Upper left corner.
    UpperLeft,
    /// Lower left corner.
    LowerLeft,
    /// Lower right corner.
    LowerRight,
}

impl ChartSpec {
    /// A linear-y chart with no series yet.
    pub fn new(title: impl Into<String>, x_label: impl Into<String>, y_label: impl Into<String>) -> ChartSpec {
        ChartSpec {
            title: title.into(),
            x_label: x_label.into(),
            y_label: y_label.into(),
            log_y: false,
            y_floor: 1e-300,
            series: Vec::new(),
            size: (900, 600),
            legend: Legend::UpperRight,
        }
    }
    /// Moves the legend.
    pub fn legend(mut self, at: Legend) -> ChartSpec {
        self.legend = at;
        self
    }
    /// Switches to a log y axis (any number of decades), not drawing values at or
    /// below `floor`.
    pub fn log_y(mut self, floor: f64) -> ChartSpec {
        self.log_y = true;
        self.y_floor = floor;
        self
    }
    /// Appends a series.
    pub fn series(mut self, s: Series) -> ChartSpec {
        self.series.push(s);
        self
    }
}

/// Tableau-10 colors: distinguishable, and readable on white.
const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// The i-th palette color, for series that must share a color (e.g. chosen and rejected).
pub fn palette(i: usize) -> (u8, u8, u8) {
    let c = PALETTE[i % PALETTE.len()];
    (c.0, c.1, c.2)
}

/// Draws `spec` as a PNG at `path`, written through `prefopt_fs::write_atomic` like every
/// other output (drawn in memory, encoded, then one atomic write).
pub fn line_chart(path: &Path, spec: &ChartSpec) -> Result<()> {
    register_font()?;
    let (w, h) = spec.size;
    let mut rgb = vec![0u8; w as usize * h as usize * 3];
    draw(&mut rgb, spec).with_context(|| format!("drawing {}", path.display()))?;
    let mut png = Vec::new();
    image::codecs::png::PngEncoder::new(&mut png)
        .write_image(&rgb, w, h, image::ColorType::Rgb8)
        .with_context(|| format!("encoding {}", path.display()))?;
    Ok(prefopt_fs::write_atomic(path, &png)?)
}

/// A tick label without trailing zeros: `5`, `0.25`, `1.5e-5`.
fn short_number(v: &f64) -> String {
    let v = *v;
    // Tick positions computed in floating point land near, not on, zero.
    if v.abs() < 1e-12 {
        return "0".into();
    }
    if (1e-3..1e5).contains(&v.abs()) {
        let s = format!("{v:.3}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        format!("{v:.1e}")
    }
}

fn visible(spec: &ChartSpec, y: f64) -> bool {
    y.is_finite() && (!spec.log_y || y > spec.y_floor)
}

fn draw(rgb: &mut [u8], spec: &ChartSpec) -> Result<()> {
    // Data ranges over everything that will be drawn.
    let xs = spec.series.iter().flat_map(|s| s.points.iter().map(|p| p.0)).filter(|x| x.is_finite());
    let (mut x0, mut x1) = xs.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), x| (a.min(x), b.max(x)));
    if !x0.is_finite() {
        (x0, x1) = (0.0, 1.0);
    }
    if x1 <= x0 {
        (x0, x1) = (x0 - 0.5, x0 + 0.5);
    }
    let ys = spec.series.iter().flat_map(|s| {
        s.points.iter().map(|p| p.1).chain(s.band.iter().flatten().flat_map(|b| [b.1, b.2])).collect::<Vec<_>>()
    });
    let (mut y0, mut y1) =
        ys.filter(|&y| visible(spec, y)).fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), y| (a.min(y), b.max(y)));
    if !y0.is_finite() {
        (y0, y1) = if spec.log_y { (1e-3, 1.0) } else { (0.0, 1.0) };
    }
    let root = BitMapBackend::with_buffer(rgb, spec.size).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let axis = if spec.log_y {
        // A log axis drawn by hand on log10(y), over whole decades so that grid lines
        // fall on round values: up to 3 decades, a line at every 1..9 x 10^k and labels
        // at 1, 2, 5 x 10^k; more, a line per decade and a label every `step` decades.
        let lo = y0.log10().floor() as i32;
        let hi = (y1.log10().ceil() as i32).max(lo + 1);
        let decades = hi - lo;
        let step = (decades + 7) / 8;
        let mut ticks = Vec::new();
        for e in lo..=hi {
            let mantissas: &[i32] = if decades <= 3 { &[1, 2, 3, 4, 5, 6, 7, 8, 9] } else { &[1] };
            for &m in mantissas {
                let v = (m as f64).log10() + e as f64;
                if v > hi as f64 + 1e-9 {
                    break;
                }
                let show = if decades <= 3 { matches!(m, 1 | 2 | 5) } else { e.rem_euclid(step) == 0 };
                let label = match (show, m) {
                    (false, _) => String::new(),
                    (true, _) if (-3..=4).contains(&e) => short_number(&(m as f64 * 10f64.powi(e))),
                    (true, 1) => format!("1e{e}"),
                    (true, m) => format!("{m}e{e}"),
                };
                ticks.push((v, label));
            }
        }
        YAxis { range: lo as f64..hi as f64, log_ticks: Some(ticks) }
    } else {
        let pad = if y1 > y0 { 0.05 * (y1 - y0) } else { 0.5 };
        YAxis { range: (y0 - pad)..(y1 + pad), log_ticks: None }
    };
    render(&root, spec, x0..x1, axis)?;
    root.present().map_err(|e| anyhow!("{e}"))?;
    Ok(())
}

/// The y axis: its range in plot units (log10 of the value on a log axis) and, for a
/// log axis, the hand-made grid lines `(log10 value, label or "")`.
struct YAxis {
    range: Range<f64>,
    log_ticks: Option<Vec<(f64, String)>>,
}

fn render<DB>(
    root: &DrawingArea<DB, plotters::coord::Shift>,
    spec: &ChartSpec,
    x_range: Range<f64>,
    axis: YAxis,
) -> Result<()>
where
    DB: DrawingBackend,
    DB::ErrorType: 'static,
{
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow!("{e:?}");
    let log = axis.log_ticks.is_some();
    // Plot units: log10 of the value on a log axis.
    let ty = |y: f64| if log { y.log10() } else { y };
    let (xa, xb) = (x_range.start, x_range.end);
    let mut chart = ChartBuilder::on(root)
        .caption(&spec.title, (FAMILY, 24))
        .margin(16)
        .x_label_area_size(50)
        .y_label_area_size(80)
        .build_cartesian_2d(x_range, axis.range.clone())
        .map_err(err)?;
    let mut mesh = chart.configure_mesh();
    mesh.x_desc(spec.x_label.as_str())
        .y_desc(spec.y_label.as_str())
        .label_style((FAMILY, 16))
        .axis_desc_style((FAMILY, 18))
        .y_label_formatter(&short_number)
        .x_label_formatter(&short_number)
        .light_line_style(WHITE.mix(0.0));
    if log {
        mesh.y_labels(0).disable_y_mesh();
    }
    mesh.draw().map_err(err)?;
    if let Some(ticks) = &axis.log_ticks {
        let grid = BLACK.mix(0.12);
        let major = BLACK.mix(0.25);
        chart
            .draw_series(ticks.iter().map(|(v, label)| {
                PathElement::new(vec![(xa, *v), (xb, *v)], if label.is_empty() { grid } else { major })
            }))
            .map_err(err)?;
        let style = TextStyle::from((FAMILY, 16).into_font()).pos(Pos::new(HPos::Right, VPos::Center));
        for (v, label) in ticks.iter().filter(|t| !t.1.is_empty()) {
            let (px, py) = chart.backend_coord(&(xa, *v));
            root.draw(&Text::new(label.clone(), (px - 8, py), style.clone())).map_err(err)?;
            root.draw(&PathElement::new(vec![(px - 5, py), (px, py)], BLACK)).map_err(err)?;
        }
    }
    let mut next = 0;
    for s in &spec.series {
        let color = match s.color {
            Some((r, g, b)) => RGBColor(r, g, b),
            None => {
                next += 1;
                PALETTE[(next - 1) % PALETTE.len()]
            }
        };
        if let Some(band) = &s.band {
            let band: Vec<_> = band.iter().filter(|b| visible(spec, b.1) && visible(spec, b.2)).collect();
            if band.len() >= 2 {
                let outline: Vec<(f64, f64)> =
                    band.iter().map(|b| (b.0, ty(b.2))).chain(band.iter().rev().map(|b| (b.0, ty(b.1)))).collect();
                chart.draw_series(std::iter::once(Polygon::new(outline, color.mix(0.15).filled()))).map_err(err)?;
            }
        }
        let pts: Vec<(f64, f64)> =
            s.points.iter().filter(|p| p.0.is_finite() && visible(spec, p.1)).map(|p| (p.0, ty(p.1))).collect();
        let style = color.stroke_width(3);
        let anno = if s.dashed {
            chart.draw_series(DashedLineSeries::new(pts.clone(), 8, 5, style)).map_err(err)?
        } else {
            chart.draw_series(LineSeries::new(pts.clone(), style)).map_err(err)?
        };
        if !s.name.is_empty() && !pts.is_empty() {
            anno.label(s.name.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(3)));
        }
        if s.markers {
            chart.draw_series(pts.iter().map(|&p| Circle::new(p, 4, color.filled()))).map_err(err)?;
        }
    }
    if spec.series.iter().any(|s| !s.name.is_empty()) {
        chart
            .configure_series_labels()
            .label_font((FAMILY, 16))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.4))
            .position(match spec.legend {
                Legend::UpperRight => SeriesLabelPosition::UpperRight,
                Legend::UpperLeft => SeriesLabelPosition::UpperLeft,
                Legend::LowerLeft => SeriesLabelPosition::LowerLeft,
                Legend::LowerRight => SeriesLabelPosition::LowerRight,
            })
            .draw()
            .map_err(err)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_a_png_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("chart.png");
        let spec = ChartSpec::new("t", "x", "y")
            .log_y(1e-12)
            .series(
                Series::new("a", vec![(0.0, 1.0), (1.0, 1e-3), (2.0, 0.0)])
                    .with_band(vec![(0.0, 0.5, 2.0), (1.0, 1e-4, 1e-2)]),
            )
            .series(Series::new("b", vec![(0.0, 0.5), (2.0, 0.25)]).with_markers().dashed());
        line_chart(&path, &spec).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[1..4], b"PNG");
        // Nothing but the chart is left in the directory.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
