/*
 * Glue between the locally served ipywidgets HTML manager, RequireJS and MathJax 3.
 * Loaded (via nb_ipywidgets_js in _config.yml) on pages with saved widget state, after
 * RequireJS and before vendor/html-manager/embed-amd.js.
 */
(function () {
  "use strict";

  // The widget manager's AMD modules locate their icon fonts relative to their RequireJS
  // module URL; without this mapping that URL is "<page folder>/@jupyter-widgets/...", which
  // does not exist. Point it at the vendored copy next to this file.
  const vendor = new URL("vendor/", document.currentScript.src).href;
  require.config({
    paths: { "@jupyter-widgets/html-manager/dist": vendor + "html-manager" },
  });

  // ipywidgets typesets labels with the MathJax 2 call MathJax.Hub.Queue(["Typeset", hub, el]);
  // Sphinx loads MathJax 3, which has no Hub. Map that call onto MathJax 3's typesetPromise,
  // chained on startup.promise as MathJax 3 recommends for typesetting after page load.
  function installHub() {
    const mathjax = window.MathJax;
    if (!mathjax || mathjax.Hub || !mathjax.startup || !mathjax.startup.promise) {
      return;
    }
    mathjax.Hub = {
      Queue(...commands) {
        for (const command of commands) {
          if (Array.isArray(command) && command[0] === "Typeset") {
            const elements = command[2] ? [command[2]] : undefined;
            mathjax.startup.promise = mathjax.startup.promise
              .then(() => mathjax.typesetPromise(elements))
              .catch((error) => console.warn("MathJax typeset of a widget failed:", error));
          }
        }
      },
    };
  }
  // MathJax is a deferred script: it has run by DOMContentLoaded, before widgets render.
  document.addEventListener("DOMContentLoaded", installHub);
})();
