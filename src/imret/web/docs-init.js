// Starts Swagger UI on the /docs page of `imret serve` (the page and Swagger UI's files are
// served by src/imret/server.py from the swagger-ui-bundle package). A file of its own rather
// than an inline script, so the page's Content-Security-Policy (script-src 'self') holds.
"use strict";

window.addEventListener("DOMContentLoaded", () => {
  window.ui = SwaggerUIBundle({
    url: "/openapi.json",
    dom_id: "#swagger-ui",
    layout: "BaseLayout",
    presets: [SwaggerUIBundle.presets.apis, SwaggerUIBundle.SwaggerUIStandalonePreset],
    deepLinking: true,
    showExtensions: true,
    showCommonExtensions: true,
    // the default asks validator.swagger.io for a badge: no request leaves this server
    validatorUrl: null,
  });
});
