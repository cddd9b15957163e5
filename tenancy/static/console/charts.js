// The overview's charts: uPlot (vendored) draws the series the page embeds as JSON
// (<script type="application/json" id="overview-series">, never executed).
(function () {
  "use strict";
  var source = document.getElementById("overview-series");
  if (!source || typeof uPlot === "undefined") return;
  var data = JSON.parse(source.textContent);
  var palette = ["#0b57d0", "#b3261e", "#1a7f37", "#9a6700"];

  function draw(container) {
    var names = container.getAttribute("data-series").split(",");
    var columns = [data.t];
    var series = [{}];
    names.forEach(function (name, i) {
      columns.push(data[name]);
      series.push({ label: container.getAttribute("data-label-" + name) || name, stroke: palette[i % palette.length], width: 2, spanGaps: true });
    });
    var width = Math.max(container.clientWidth - 8, 280);
    var plot = new uPlot({ width: width, height: 200, series: series, scales: { x: { time: true } } }, columns, container);
    window.addEventListener("resize", function () {
      plot.setSize({ width: Math.max(container.clientWidth - 8, 280), height: 200 });
    });
    container.setAttribute("data-drawn", "1");
  }

  document.querySelectorAll("[data-chart]").forEach(draw);
})();
