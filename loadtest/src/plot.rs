//! Draws a [`Report`] as a PNG (`--plot`): a header with the verdict and the key figures,
//! then three panels over the measured phase: delivery latency, throughput (or, for a
//! `--ramp` run, delivered rate and p99 per offered rate) and CPU / broker memory.
//!
//! Text is rendered with plotters' pure-Rust `ab_glyph` backend, which loads no system
//! fonts by itself: a TTF from the usual Debian/Ubuntu locations is registered once at
//! first use, and a missing font is an error, not a panic.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::coord::types::RangedCoordf64;
use plotters::element::DashedPathElement;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::error::{Error, Result};
use crate::report::{Interval, RampStep, Report};

/// Image size in pixels.
const WIDTH: u32 = 1200;
const HEIGHT: u32 = 900;

/// The family name the font is registered under (plotters' default for labels).
const FONT: &str = "sans-serif";
/// Fonts tried, in order.
const FONT_PATHS: [&str; 2] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
];

/// Chart geometry, shared by all panels so their plotting areas line up.
const MARGIN: i32 = 10;
const Y_LABEL_W: i32 = 78;
const X_LABEL_H: i32 = 42;
const HEADING_H: u32 = 26;
/// Left edge of every plotting area, relative to its panel.
const PLOT_LEFT: i32 = MARGIN + Y_LABEL_W;

/// Series colours (the tab10 palette, distinguishable in print and for most colour blindness).
const C_BLUE: RGBColor = RGBColor(31, 119, 180);
const C_ORANGE: RGBColor = RGBColor(255, 127, 14);
const C_GREEN: RGBColor = RGBColor(44, 160, 44);
const C_RED: RGBColor = RGBColor(214, 39, 40);
const C_PURPLE: RGBColor = RGBColor(148, 103, 189);
const C_GREY: RGBColor = RGBColor(127, 127, 127);
const C_BROWN: RGBColor = RGBColor(140, 86, 75);
const C_TEXT: RGBColor = RGBColor(45, 45, 45);

type Area<'p> = DrawingArea<BitMapBackend<'p>, Shift>;
type Xy = Cartesian2d<RangedCoordf64, RangedCoordf64>;

/// Renders `report` to a PNG at `path` (written whole or not at all, whatever the extension).
pub fn write_png(report: &Report, path: &Path) -> Result<()> {
    ensure_font()?;
    let Some(name) = path.file_name() else {
        return Err(Error::Plot(format!("plot path {} has no file name", path.display())));
    };
    // The encoder picks the format from the extension, so draw to a `.png` sibling and
    // rename it into place: the target never holds a half-written image.
    let mut partial = name.to_os_string();
    partial.push(".partial.png");
    let partial: PathBuf = path.with_file_name(partial);
    let result = draw(report, &partial).and_then(|()| {
        std::fs::rename(&partial, path).map_err(Error::io(format!("renaming {} into place", partial.display())))
    });
    if result.is_err() {
        // The backend saves on drop even after a failed draw; do not leave that behind.
        let _ = std::fs::remove_file(&partial);
    }
    result.map_err(|e| Error::WritingPlot { path: path.to_path_buf(), source: Box::new(e) })
}

/// Registers the font with plotters once per process.
fn ensure_font() -> Result<()> {
    static REGISTERED: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    REGISTERED.get_or_init(register_font).clone().map_err(Error::Plot)
}

fn register_font() -> std::result::Result<(), String> {
    let mut problems = Vec::new();
    for path in FONT_PATHS {
        match std::fs::read(path) {
            Ok(bytes) => {
                // plotters keeps a `&'static` to the font data for the life of the process.
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                match plotters::style::register_font(FONT, FontStyle::Normal, bytes) {
                    Ok(()) => return Ok(()),
                    Err(_) => problems.push(format!("{path}: not a usable TrueType/OpenType font")),
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => problems.push(format!("{path}: not found")),
            Err(e) => problems.push(format!("{path}: {e}")),
        }
    }
    Err(format!("no font for the plot; tried {} (install fonts-dejavu-core or fonts-liberation)", problems.join("; ")))
}

fn draw(report: &Report, path: &Path) -> Result<()> {
    let root = BitMapBackend::new(path, (WIDTH, HEIGHT)).into_drawing_area();
    root.fill(&WHITE)?;
    let failed: Vec<String> =
        report.checks.iter().filter(|c| !c.ok).map(|c| format!("{} ({})", c.name, c.detail)).collect();
    let header_h = if failed.is_empty() { 108 } else { 128 };
    let (header, body) = root.split_vertically(header_h);
    draw_header(&header, report, &failed)?;
    let body = body.margin(0, 6, 0, 0);
    if report.timeline.is_empty() && report.ramp.is_empty() {
        no_samples(&body, "no samples: the run recorded an empty timeline")?;
    } else {
        let panels = body.split_evenly((3, 1));
        let [latency, middle, resources] = panels.as_slice() else {
            return Err(Error::Plot(format!("internal error: split_evenly((3, 1)) gave {} panels", panels.len())));
        };
        latency_panel(latency, report)?;
        if report.ramp.is_empty() {
            throughput_panel(middle, report)?;
        } else {
            ramp_panel(middle, &report.ramp)?;
        }
        resource_panel(resources, report)?;
    }
    root.present()?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Header
// ---------------------------------------------------------------------------------------

fn draw_header(area: &Area<'_>, report: &Report, failed: &[String]) -> Result<()> {
    let (w, _) = area.dim_in_pixel();
    let w = w as i32;
    let left = MARGIN + 4;

    // Verdict badge, top right.
    let passed = report.passed();
    let (verdict, colour) = if passed { ("PASS", C_GREEN) } else { ("FAIL", C_RED) };
    let (bw, bh) = (120, 44);
    let bx = w - bw - MARGIN - 4;
    area.draw(&Rectangle::new([(bx, 10), (bx + bw, 10 + bh)], colour.filled()))?;
    let badge_style = (FONT, 30).into_font().color(&WHITE).pos(Pos::new(HPos::Center, VPos::Center));
    area.draw(&Text::new(verdict, (bx + bw / 2, 10 + bh / 2), badge_style))?;

    let scenario = if report.scenario.is_empty() { "(unnamed scenario)" } else { report.scenario.as_str() };
    let title_style = (FONT, 28).into_font().color(&BLACK);
    let title = fit(area, &format!("Switchboard load: {scenario}"), &title_style, (bx - left - 16) as u32)?;
    area.draw(&Text::new(title, (left, 12), title_style))?;

    let line_style = (FONT, 15).into_font().color(&C_TEXT);
    let max_w = (bx - left - 16) as u32;
    let params = if report.params.is_empty() {
        "no parameters".to_string()
    } else {
        report.params.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join("   ")
    };
    let checks_ok = report.checks.iter().filter(|c| c.ok).count();
    let counts = format!(
        "duration {:.1} s   ·   sent {}   acked {} ({}/s)   delivered {} ({}/s)   ·   checks {}/{} passed",
        report.duration_s,
        group(report.sent),
        group(report.acked),
        si(report.acked_per_s),
        group(report.delivered),
        si(report.delivered_per_s),
        checks_ok,
        report.checks.len(),
    );
    let mut quality = String::new();
    if report.latency.count > 0 {
        let l = &report.latency;
        quality += &format!(
            "{} latency p50 {:.2} ms  p99 {:.2} ms  p99.9 {:.2} ms  max {:.2} ms   ·   ",
            if report.latency_label.is_empty() { "delivery" } else { report.latency_label.as_str() },
            l.p50_ms,
            l.p99_ms,
            l.p999_ms,
            l.max_ms
        );
    }
    if report.ack_latency.count > 0 {
        quality += &format!("ack p99 {:.2} ms   ·   ", report.ack_latency.p99_ms);
    }
    quality += &format!(
        "lost {}   duplicated {}   out of order {}   errors {}",
        report.lost, report.duplicated, report.out_of_order, report.errors
    );
    let mut y = 48;
    for line in [params, counts, quality] {
        let line = fit(area, &line, &line_style, if y < 10 + bh { max_w } else { (w - left - MARGIN) as u32 })?;
        area.draw(&Text::new(line, (left, y), line_style.clone()))?;
        y += 20;
    }
    if !failed.is_empty() {
        let fail_style = (FONT, 15).into_font().color(&C_RED);
        let line = fit(area, &format!("failed: {}", failed.join("; ")), &fail_style, (w - left - MARGIN) as u32)?;
        area.draw(&Text::new(line, (left, y), fail_style))?;
    }
    // Rule under the header.
    area.draw(&PathElement::new(
        vec![(MARGIN, header_bottom(area)), (w - MARGIN, header_bottom(area))],
        C_GREY.mix(0.5),
    ))?;
    Ok(())
}

fn header_bottom(area: &Area<'_>) -> i32 {
    area.dim_in_pixel().1 as i32 - 2
}

// ---------------------------------------------------------------------------------------
// Panels
// ---------------------------------------------------------------------------------------

fn latency_panel(area: &Area<'_>, report: &Report) -> Result<()> {
    let tl = &report.timeline;
    // Seconds with no delivery have no latency: leaving them out, not drawing them as
    // 0 ms (a ramp's pauses between steps made a sawtooth: a trial).
    let delivered: Vec<Interval> = tl.iter().filter(|i| i.delivered_per_s > 0.0).cloned().collect();
    let p50 = series(&delivered, |i| i.p50_ms);
    let p99 = series(&delivered, |i| i.p99_ms);
    let keys = [
        Key::line(format!("p99 (peak {:.2} ms)", max_of(&p99)), C_RED),
        Key::line(format!("p50 (peak {:.2} ms)", max_of(&p50)), C_BLUE),
    ];
    let rest = heading(area, "Delivery latency per second (scheduled send to delivery)", &keys)?;
    if tl.is_empty() {
        return no_samples(&rest, "no samples");
    }
    let x = time_range(tl);
    let y_top = top(p50.iter().chain(&p99).map(|p| p.1), 1.0);
    let mut chart = chart_builder(&rest, false).build_cartesian_2d(x, 0.0..y_top)?;
    mesh(&mut chart, "time (s)", "latency (ms)", &fmt_plain)?;
    draw_line(&mut chart, &p99, C_RED)?;
    draw_line(&mut chart, &p50, C_BLUE)?;
    Ok(())
}

fn throughput_panel(area: &Area<'_>, report: &Report) -> Result<()> {
    let tl = &report.timeline;
    let delivered = series(tl, |i| i.delivered_per_s);
    let sent = series(tl, |i| i.sent_per_s);
    let keys = [
        Key::line(format!("delivered/s (mean {})", si(mean_of(&delivered))), C_GREEN),
        Key::line(format!("sent/s (mean {})", si(mean_of(&sent))), C_BLUE),
    ];
    let rest = heading(area, "Throughput", &keys)?;
    if tl.is_empty() {
        return no_samples(&rest, "no samples");
    }
    let x = time_range(tl);
    let y_top = top(delivered.iter().chain(&sent).map(|p| p.1), 10.0);
    let mut chart = chart_builder(&rest, false).build_cartesian_2d(x, 0.0..y_top)?;
    mesh(&mut chart, "time (s)", "messages / s", &fmt_si)?;
    draw_line(&mut chart, &sent, C_BLUE)?;
    draw_line(&mut chart, &delivered, C_GREEN)?;
    Ok(())
}

fn ramp_panel(area: &Area<'_>, ramp: &[RampStep]) -> Result<()> {
    let mut steps: Vec<&RampStep> = ramp.iter().filter(|s| s.offered_rate.is_finite()).collect();
    steps.sort_by(|a, b| a.offered_rate.total_cmp(&b.offered_rate));
    let ok = steps.iter().filter(|s| s.ok).count();
    // The report's result (the fastest step before the first failure), not the highest
    // step that passed anywhere: a step past a failure that passed again is no
    // sustained rate.
    let title = match crate::run::sustained(ramp, |s| s.ok, true) {
        (b, d) if d > 0.0 => {
            format!("Ramp: {} steps, {ok} ok, sustained {} msgs/s = {} deliveries/s", steps.len(), si(b), si(d))
        }
        _ => format!("Ramp: {} steps, none sustained", steps.len()),
    };
    let mut keys = vec![
        Key::line("delivered/s", C_GREEN),
        Key::dashed("offered deliveries/s", C_GREY),
        Key::line("p99 ms (right axis)", C_ORANGE),
        Key::dot("step failed", C_RED),
    ];
    if steps.iter().any(|s| s.transient) {
        keys.push(Key::dot("failed, its repeat passed", C_BROWN));
    }
    let rest = heading(area, &title, &keys)?;
    if steps.is_empty() {
        return no_samples(&rest, "no ramp steps");
    }
    let delivered: Vec<(f64, f64)> =
        steps.iter().map(|s| (s.offered_rate, s.delivered_per_s)).filter(|p| p.1.is_finite()).collect();
    let p99: Vec<(f64, f64)> = steps.iter().map(|s| (s.offered_rate, s.p99_ms)).filter(|p| p.1.is_finite()).collect();
    let x_top = top(steps.iter().map(|s| s.offered_rate), 10.0);
    let offered: Vec<(f64, f64)> =
        steps.iter().map(|s| (s.offered_rate, s.offered_deliveries_per_s)).filter(|p| p.1.is_finite()).collect();
    let y_top = top(offered.iter().chain(&delivered).map(|p| p.1), 10.0);
    let p99_top = top(p99.iter().map(|p| p.1), 1.0);

    let mut chart = chart_builder(&rest, true)
        .build_cartesian_2d(0.0..x_top, 0.0..y_top)?
        .set_secondary_coord(0.0..x_top, 0.0..p99_top);
    chart
        .configure_mesh()
        .x_desc("offered rate (messages / s)")
        .y_desc("deliveries / s")
        .x_labels(12)
        .y_labels(6)
        .label_style((FONT, 13))
        .axis_desc_style((FONT, 14))
        .bold_line_style(BLACK.mix(0.12))
        .light_line_style(TRANSPARENT)
        .x_label_formatter(&fmt_si)
        .y_label_formatter(&fmt_si)
        .draw()?;
    chart
        .configure_secondary_axes()
        .y_desc("p99 latency (ms)")
        .y_labels(6)
        .label_style((FONT, 13))
        .axis_desc_style((FONT, 14))
        .y_label_formatter(&fmt_plain)
        .draw()?;

    chart.draw_series(DashedLineSeries::new(offered.iter().copied(), 8, 5, C_GREY.stroke_width(2)))?;
    chart.draw_series(LineSeries::new(delivered.iter().copied(), C_GREEN.stroke_width(2)))?;
    chart.draw_series(
        steps
            .iter()
            .filter(|s| s.delivered_per_s.is_finite())
            .map(|s| Circle::new((s.offered_rate, s.delivered_per_s), 5, step_colour(s, C_GREEN).filled())),
    )?;
    chart.draw_secondary_series(LineSeries::new(p99.iter().copied(), C_ORANGE.stroke_width(2)))?;
    chart.draw_secondary_series(
        steps
            .iter()
            .filter(|s| s.p99_ms.is_finite())
            .map(|s| TriangleMarker::new((s.offered_rate, s.p99_ms), 6, step_colour(s, C_ORANGE).filled())),
    )?;
    Ok(())
}

/// A ramp step's marker: `passed` if it passed, brown if it failed and its repeat at
/// the same rate passed (`transient`: it did not end the ramp), red if its failure
/// counted. A transient step was drawn red, as if it had ended the ramp (a review).
fn step_colour(step: &RampStep, passed: RGBColor) -> RGBColor {
    match (step.ok, step.transient) {
        (true, _) => passed,
        (false, true) => C_BROWN,
        (false, false) => C_RED,
    }
}

fn resource_panel(area: &Area<'_>, report: &Report) -> Result<()> {
    let tl = &report.timeline;
    let broker_known = report.broker.is_some() || tl.iter().any(|i| i.broker_cpu_pct != 0.0 || i.broker_rss_mib != 0.0);
    let harness = series(tl, |i| i.harness_cpu_pct);
    let (broker, rss) = if broker_known {
        (series(tl, |i| i.broker_cpu_pct), series(tl, |i| i.broker_rss_mib))
    } else {
        (Vec::new(), Vec::new())
    };
    let mut keys = Vec::new();
    // The means the text report gives (over the measured phase), not of every second
    // drawn (set-up and drain included): the two disagreed (a trial: 99% here, 93% there).
    if broker_known {
        let mean = report.broker.as_ref().map_or_else(|| mean_of(&broker), |b| b.cpu_pct_mean);
        keys.push(Key::line(format!("broker CPU (measured mean {mean:.0}%)"), C_RED));
    }
    keys.push(Key::line(format!("harness CPU (measured mean {:.0}%)", report.harness.cpu_pct_mean), C_BLUE));
    if broker_known {
        keys.push(Key::dashed(format!("broker RSS, right axis (peak {:.1} MiB)", max_of(&rss)), C_PURPLE));
    }
    let title = if broker_known { "CPU and broker memory" } else { "CPU (broker not measured)" };
    let rest = heading(area, title, &keys)?;
    if tl.is_empty() {
        return no_samples(&rest, "no samples");
    }
    let x = time_range(tl);
    let cpu_top = top(broker.iter().chain(&harness).map(|p| p.1), 10.0);
    let rss_top = top(rss.iter().map(|p| p.1), 1.0);
    let mut chart =
        chart_builder(&rest, true).build_cartesian_2d(x.clone(), 0.0..cpu_top)?.set_secondary_coord(x, 0.0..rss_top);
    mesh(&mut chart, "time (s)", "CPU (% of one core)", &fmt_plain)?;
    if broker_known {
        chart
            .configure_secondary_axes()
            .y_desc("broker RSS (MiB)")
            .y_labels(6)
            .label_style((FONT, 13))
            .axis_desc_style((FONT, 14))
            .y_label_formatter(&fmt_plain)
            .draw()?;
        chart.draw_secondary_series(DashedLineSeries::new(rss.iter().copied(), 8, 5, C_PURPLE.stroke_width(2)))?;
        draw_line(&mut chart, &broker, C_RED)?;
    }
    draw_line(&mut chart, &harness, C_BLUE)?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Building blocks
// ---------------------------------------------------------------------------------------

/// A legend entry, drawn in the panel's heading row so it never hides data.
struct Key {
    label: String,
    colour: RGBColor,
    kind: KeyKind,
}

enum KeyKind {
    Line,
    Dashed,
    Dot,
}

impl Key {
    fn line(label: impl Into<String>, colour: RGBColor) -> Self {
        Key { label: label.into(), colour, kind: KeyKind::Line }
    }
    fn dashed(label: impl Into<String>, colour: RGBColor) -> Self {
        Key { label: label.into(), colour, kind: KeyKind::Dashed }
    }
    fn dot(label: impl Into<String>, colour: RGBColor) -> Self {
        Key { label: label.into(), colour, kind: KeyKind::Dot }
    }
}

/// Draws the panel title and its legend in one row; returns the area below.
fn heading<'p>(area: &Area<'p>, title: &str, keys: &[Key]) -> Result<Area<'p>> {
    let (head, rest) = area.split_vertically(HEADING_H);
    let y = HEADING_H as i32 / 2 + 2;
    let title_style = (FONT, 17).into_font().color(&BLACK).pos(Pos::new(HPos::Left, VPos::Center));
    let mut x = PLOT_LEFT;
    head.draw(&Text::new(title, (x, y), title_style.clone()))?;
    x += head.estimate_text_size(title, &title_style)?.0 as i32 + 30;
    let key_style = (FONT, 14).into_font().color(&C_TEXT).pos(Pos::new(HPos::Left, VPos::Center));
    for key in keys {
        let style = key.colour.stroke_width(3);
        match key.kind {
            KeyKind::Line => head.draw(&PathElement::new(vec![(x, y), (x + 26, y)], style))?,
            KeyKind::Dashed => head.draw(&DashedPathElement::new(vec![(x, y), (x + 26, y)], 6, 4, style))?,
            KeyKind::Dot => head.draw(&Circle::new((x + 13, y), 5, key.colour.filled()))?,
        }
        x += 32;
        head.draw(&Text::new(key.label.as_str(), (x, y), key_style.clone()))?;
        x += head.estimate_text_size(&key.label, &key_style)?.0 as i32 + 24;
    }
    Ok(rest)
}

/// Every panel reserves the same width on the right so the time axes line up; only charts
/// with a secondary axis (`right_axis`) get a label area there (plotters mirrors the primary
/// axis into one otherwise).
fn chart_builder<'a, 'p>(area: &'a Area<'p>, right_axis: bool) -> ChartBuilder<'a, 'static, BitMapBackend<'p>> {
    let mut builder = ChartBuilder::on(area);
    builder
        .margin_left(MARGIN)
        .margin_top(6)
        .margin_bottom(4)
        .y_label_area_size(Y_LABEL_W)
        .x_label_area_size(X_LABEL_H);
    if right_axis {
        builder.margin_right(MARGIN).right_y_label_area_size(Y_LABEL_W);
    } else {
        builder.margin_right(MARGIN + Y_LABEL_W);
    }
    builder
}

fn mesh(
    chart: &mut ChartContext<'_, BitMapBackend<'_>, Xy>,
    x_desc: &str,
    y_desc: &str,
    y_fmt: &dyn Fn(&f64) -> String,
) -> Result<()> {
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc(y_desc)
        .x_labels(15)
        .y_labels(6)
        .label_style((FONT, 13))
        .axis_desc_style((FONT, 14))
        .bold_line_style(BLACK.mix(0.12))
        .light_line_style(TRANSPARENT)
        .x_label_formatter(&fmt_plain)
        .y_label_formatter(y_fmt)
        .draw()?;
    Ok(())
}

/// A line over time, with a marker per sample while they are few enough to tell apart.
fn draw_line(
    chart: &mut ChartContext<'_, BitMapBackend<'_>, Xy>,
    points: &[(f64, f64)],
    colour: RGBColor,
) -> Result<()> {
    let marker = if points.len() <= 90 { 3 } else { 0 };
    chart.draw_series(LineSeries::new(points.iter().copied(), colour.filled().stroke_width(2)).point_size(marker))?;
    Ok(())
}

/// A framed placeholder for a panel (or the whole body) with nothing to draw.
fn no_samples(area: &Area<'_>, message: &str) -> Result<()> {
    let (w, h) = area.dim_in_pixel();
    let (w, h) = (w as i32, h as i32);
    let (x0, x1) = (PLOT_LEFT, (w - MARGIN - Y_LABEL_W).max(PLOT_LEFT + 1));
    let (y0, y1) = (6, (h - X_LABEL_H).max(7));
    area.draw(&Rectangle::new([(x0, y0), (x1, y1)], C_GREY.mix(0.6).stroke_width(1)))?;
    let style = (FONT, 22).into_font().color(&C_GREY).pos(Pos::new(HPos::Center, VPos::Center));
    area.draw(&Text::new(message, ((x0 + x1) / 2, (y0 + y1) / 2), style))?;
    Ok(())
}

/// `(t_s, f(interval))` for every interval where both are finite.
fn series(timeline: &[Interval], f: impl Fn(&Interval) -> f64) -> Vec<(f64, f64)> {
    timeline.iter().map(|i| (i.t_s, f(i))).filter(|(x, y)| x.is_finite() && y.is_finite()).collect()
}

/// The time axis: from zero (or the first sample, if earlier) to the last sample, at least 1 s wide.
fn time_range(timeline: &[Interval]) -> Range<f64> {
    let ts = || timeline.iter().map(|i| i.t_s).filter(|t| t.is_finite());
    let lo = ts().fold(0.0, f64::min);
    let hi = ts().fold(lo, f64::max);
    if hi - lo < 1.0 { lo..lo + 1.0 } else { lo..hi }
}

/// An upper axis bound with a little headroom; `floor` when everything is zero or missing.
fn top(values: impl IntoIterator<Item = f64>, floor: f64) -> f64 {
    let max = values.into_iter().filter(|v| v.is_finite()).fold(0.0, f64::max);
    if max > 0.0 { max * 1.1 } else { floor }
}

fn max_of(points: &[(f64, f64)]) -> f64 {
    points.iter().map(|p| p.1).fold(0.0, f64::max)
}

fn mean_of(points: &[(f64, f64)]) -> f64 {
    if points.is_empty() { 0.0 } else { points.iter().map(|p| p.1).sum::<f64>() / points.len() as f64 }
}

/// `text`, cut with an ellipsis to fit `max_w` pixels.
fn fit(area: &Area<'_>, text: &str, style: &TextStyle<'_>, max_w: u32) -> Result<String> {
    if area.estimate_text_size(text, style)?.0 <= max_w {
        return Ok(text.to_string());
    }
    let mut chars: Vec<char> = text.chars().collect();
    while chars.pop().is_some() {
        let cut: String = chars.iter().collect::<String>().trim_end().to_string() + "…";
        if area.estimate_text_size(&cut, style)?.0 <= max_w {
            return Ok(cut);
        }
    }
    Ok(String::new())
}

fn fmt_plain(v: &f64) -> String {
    let a = v.abs();
    if a == 0.0 || a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        trim_zero(format!("{v:.1}"))
    } else {
        trim_zero(format!("{v:.2}"))
    }
}

fn fmt_si(v: &f64) -> String {
    si(*v)
}

/// 950, 1.5k, 12k, 2.25M: compact rates for axes and legends.
fn si(v: f64) -> String {
    let a = v.abs();
    let (scaled, suffix) = if a >= 1e6 {
        (v / 1e6, "M")
    } else if a >= 1e3 {
        (v / 1e3, "k")
    } else {
        return fmt_plain(&v);
    };
    if scaled.abs() >= 100.0 {
        format!("{scaled:.0}{suffix}")
    } else {
        format!("{}{suffix}", trim_zero(format!("{scaled:.2}")))
    }
}

fn trim_zero(s: String) -> String {
    if s.contains('.') { s.trim_end_matches('0').trim_end_matches('.').to_string() } else { s }
}

/// 1234567 -> "1,234,567".
fn group(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_its_repeat_did_not_confirm_is_drawn_apart_from_one_that_counted() {
        let step = |ok, transient| RampStep { ok, transient, ..RampStep::default() };
        assert_eq!(step_colour(&step(true, false), C_GREEN), C_GREEN);
        assert_eq!(step_colour(&step(false, false), C_GREEN), C_RED);
        assert_eq!(step_colour(&step(false, true), C_ORANGE), C_BROWN);
    }
}
