//! The SVG of `blockrep bench --plot`: throughput and lag over time, the
//! cutover shaded.

use std::path::Path;

use anyhow::Result;

use crate::measure::Sample;

/// Throughput (MiB/s received by the server) and lag over time, cutover
/// shaded; `disks` (how many and their sizes) is in the throughput's title.
pub(crate) fn plot(
    path: &Path,
    samples: &[Sample],
    cutover: Option<(f64, f64)>,
    disks: &str,
) -> Result<()> {
    use plotters::prelude::*;
    let mut points = Vec::new();
    for pair in samples.windows(2) {
        let dt = (pair[1].seconds - pair[0].seconds).max(1e-3);
        let rate = pair[1]
            .bytes_received_total
            .saturating_sub(pair[0].bytes_received_total) as f64
            / dt
            / 1048576.0;
        points.push((pair[1].seconds, rate, pair[1].lag_seconds));
    }
    let t_max = samples.last().map_or(1.0, |s| s.seconds).max(1.0);
    let rate_max = points.iter().map(|p| p.1).fold(1.0, f64::max) * 1.1;
    let lag_max = points.iter().map(|p| p.2).fold(1.0, f64::max) * 1.1;
    let root = SVGBackend::new(path, (900, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
    let (upper, lower) = root.split_vertically(300);
    let throughput_title = format!("replication throughput (MiB/s), {disks}");
    for (area, title, max, pick) in [
        (&upper, throughput_title.as_str(), rate_max, 1usize),
        (&lower, "replication lag (s)", lag_max, 2usize),
    ] {
        let mut chart = ChartBuilder::on(area)
            .caption(title, ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(50)
            .build_cartesian_2d(0.0..t_max, 0.0..max)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        chart
            .configure_mesh()
            .x_desc("seconds")
            .draw()
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        if let Some((start, end)) = cutover {
            chart
                .draw_series(std::iter::once(Rectangle::new(
                    [(start, 0.0), (end, max)],
                    RED.mix(0.2).filled(),
                )))
                .map_err(|e| anyhow::anyhow!("{e}"))?
                .label("cutover");
        }
        let series = points
            .iter()
            .map(|p| (p.0, if pick == 1 { p.1 } else { p.2 }));
        chart
            .draw_series(LineSeries::new(series, &BLUE))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    root.present().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}
