// Stylesheets are bundled into app.css by esbuild.
declare module '*.css';
