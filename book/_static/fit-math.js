/*
 * Display formulas that are wider than their column are scaled down to fit, so a formula
 * never needs a horizontal scrollbar and never overflows the page. MathJax 3 cannot break a
 * long display formula over lines (MathJax 4 can); scaling keeps every symbol visible.
 * Runs after MathJax's first typesetting pass and again when the window is resized.
 */
(function () {
  "use strict";
  const MIN_SCALE = 0.6; // below this a formula becomes hard to read: it should be split

  function fit() {
    for (const box of document.querySelectorAll('mjx-container[display="true"]')) {
      box.style.fontSize = "";
      const math = box.firstElementChild;
      if (!math || box.clientWidth === 0) continue;
      const needed = math.getBoundingClientRect().width;
      if (needed > box.clientWidth) {
        const scale = Math.max(MIN_SCALE, box.clientWidth / needed);
        box.style.fontSize = `${Math.floor(scale * 1000) / 10}%`;
      }
    }
  }

  function whenTypeset() {
    const mathjax = window.MathJax;
    if (mathjax && mathjax.startup && mathjax.startup.promise) {
      mathjax.startup.promise.then(fit);
    }
  }

  document.addEventListener("DOMContentLoaded", whenTypeset);
  let pending = 0;
  window.addEventListener("resize", () => {
    cancelAnimationFrame(pending);
    pending = requestAnimationFrame(fit);
  });
})();
