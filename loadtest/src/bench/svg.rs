//! A grouped bar chart with a logarithmic y axis, as a self-contained SVG (no dependency).

pub struct Series {
    pub name: &'static str,
    pub color: &'static str,
}

pub struct Group {
    pub label: String,
    /// One value per series (µs); NaN = no bar.
    pub values: Vec<f64>,
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

fn fmt_us(v: f64) -> String {
    if v >= 10_000.0 {
        format!("{:.0} ms", v / 1000.0)
    } else if v >= 1000.0 {
        format!("{:.1} ms", v / 1000.0)
    } else {
        format!("{v:.0} µs")
    }
}

pub fn chart(title: &str, subtitle: &str, series: &[Series], groups: &[Group]) -> String {
    let (w, h) = (1000.0f64, 520.0f64);
    let (left, right, top, bottom) = (70.0, 20.0, 90.0, 80.0);
    let plot_w = w - left - right;
    let plot_h = h - top - bottom;
    let vals: Vec<f64> =
        groups.iter().flat_map(|g| g.values.iter().copied()).filter(|v| v.is_finite() && *v > 0.0).collect();
    // No values (a partial run, e.g. `--only streams`): an empty 1 µs–10 µs frame. Without this
    // guard lo is infinite and the decade loop below never ends (it filled 24 GB once).
    let lo = if vals.is_empty() { 1.0 } else { vals.iter().copied().fold(f64::INFINITY, f64::min).max(1.0) };
    let hi = vals.iter().copied().fold(0.0, f64::max).max(10.0);
    let (d0, d1) = (lo.log10().floor(), (hi * 2.5).log10().ceil().max(lo.log10().floor() + 1.0));
    let y = |v: f64| top + plot_h - (v.max(10f64.powf(d0)).log10() - d0) / (d1 - d0) * plot_h;
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" font-family=\"sans-serif\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"{}\" y=\"28\" font-size=\"18\" text-anchor=\"middle\">{}</text>\n",
        w / 2.0,
        esc(title),
    );
    for (i, line) in subtitle.lines().enumerate() {
        s.push_str(&format!(
            "<text x=\"{}\" y=\"{}\" font-size=\"12\" text-anchor=\"middle\" fill=\"#555\">{}</text>\n",
            w / 2.0,
            46 + 15 * i,
            esc(line)
        ));
    }
    // Grid and y labels at each decade (and 2x, 5x).
    let mut d = d0 as i32;
    while d as f64 <= d1 {
        for m in [1.0, 2.0, 5.0] {
            let v = m * 10f64.powi(d);
            if v.log10() > d1 + 1e-9 {
                break;
            }
            let yy = y(v);
            let (stroke, dash) = if m == 1.0 { ("#bbb", "") } else { ("#e5e5e5", " stroke-dasharray=\"3,3\"") };
            s.push_str(&format!(
                "<line x1=\"{left}\" y1=\"{yy:.1}\" x2=\"{:.1}\" y2=\"{yy:.1}\" stroke=\"{stroke}\"{dash}/>\n<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"11\" text-anchor=\"end\">{}</text>\n",
                left + plot_w,
                left - 6.0,
                yy + 4.0,
                fmt_us(v)
            ));
        }
        d += 1;
    }
    s.push_str(&format!(
        "<text x=\"18\" y=\"{:.1}\" font-size=\"12\" transform=\"rotate(-90 18 {:.1})\" text-anchor=\"middle\">latency (log scale)</text>\n",
        top + plot_h / 2.0,
        top + plot_h / 2.0
    ));
    let n = groups.len().max(1) as f64;
    let gw = plot_w / n;
    let ns = series.len().max(1) as f64;
    let bw = (gw * 0.8 / ns).min(40.0);
    for (gi, g) in groups.iter().enumerate() {
        let gx = left + gw * gi as f64 + (gw - bw * ns) / 2.0;
        for (si, v) in g.values.iter().enumerate() {
            if !v.is_finite() || *v <= 0.0 || si >= series.len() {
                continue;
            }
            let x = gx + bw * si as f64;
            let yy = y(*v);
            s.push_str(&format!(
                "<rect x=\"{x:.1}\" y=\"{yy:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{}\"><title>{} {}: {}</title></rect>\n",
                bw - 2.0,
                (top + plot_h - yy).max(0.5),
                series[si].color,
                esc(&g.label),
                series[si].name,
                fmt_us(*v)
            ));
            let tx = x + (bw - 2.0) / 2.0 + 3.0;
            s.push_str(&format!(
                "<text x=\"{tx:.1}\" y=\"{:.1}\" font-size=\"9\" transform=\"rotate(-90 {tx:.1} {:.1})\">{}</text>\n",
                yy - 3.0,
                yy - 3.0,
                fmt_us(*v)
            ));
        }
        let lx = left + gw * gi as f64 + gw / 2.0;
        for (li, line) in g.label.lines().enumerate() {
            s.push_str(&format!(
                "<text x=\"{lx:.1}\" y=\"{:.1}\" font-size=\"11\" text-anchor=\"middle\">{}</text>\n",
                top + plot_h + 16.0 + 13.0 * li as f64,
                esc(line)
            ));
        }
    }
    s.push_str(&format!(
        "<line x1=\"{left}\" y1=\"{:.1}\" x2=\"{:.1}\" y2=\"{:.1}\" stroke=\"#333\"/>\n",
        top + plot_h,
        left + plot_w,
        top + plot_h
    ));
    // Legend.
    let ly = h - 30.0;
    let mut lx = left;
    for se in series {
        s.push_str(&format!(
            "<rect x=\"{lx:.1}\" y=\"{:.1}\" width=\"14\" height=\"14\" fill=\"{}\"/>\n<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"12\">{}</text>\n",
            ly - 11.0,
            se.color,
            lx + 18.0,
            ly,
            esc(se.name)
        ));
        lx += 30.0 + 7.0 * se.name.len() as f64;
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_bars_and_skips_nan() {
        let series = [Series { name: "a", color: "#000" }, Series { name: "b", color: "#f00" }];
        let groups = vec![
            Group { label: "x<1".into(), values: vec![100.0, 2500.0] },
            Group { label: "y".into(), values: vec![f64::NAN, 40.0] },
        ];
        let s = chart("t", "s", &series, &groups);
        assert!(s.starts_with("<svg") && s.ends_with("</svg>\n"));
        assert_eq!(s.matches("<rect x=").count(), 3 + 2);
        assert!(s.contains("x&lt;1") && s.contains("2.5 ms"));
    }

    #[test]
    fn no_values_gives_an_empty_frame() {
        let series = [Series { name: "a", color: "#000" }];
        let s = chart("t", "s", &series, &[Group { label: "x".into(), values: vec![f64::NAN] }]);
        assert!(s.starts_with("<svg") && s.ends_with("</svg>\n") && s.len() < 10_000);
        let s = chart("t", "s", &series, &[]);
        assert!(s.ends_with("</svg>\n"));
    }
}
