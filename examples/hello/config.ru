# frozen_string_literal: true

# A tiny Rack app to see thruster-rs at work: `bin/demo`.
run lambda { |env|
  body = <<~HTML
    <!doctype html>
    <title>thruster-rs demo</title>
    <h1>Hello from Puma, through thruster-rs</h1>
    <p>Path: #{Rack::Utils.escape_html(env['PATH_INFO'])}</p>
    <p>X-Forwarded-For: #{Rack::Utils.escape_html(env['HTTP_X_FORWARDED_FOR'].to_s)}</p>
    <p>X-Request-Start: #{Rack::Utils.escape_html(env['HTTP_X_REQUEST_START'].to_s)}</p>
  HTML
  [200, { "content-type" => "text/html; charset=utf-8" }, [body]]
}
