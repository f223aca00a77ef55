# frozen_string_literal: true

require "rails/railtie"
require_relative "sendfile"

module Thruster
  # Puts Thruster::Sendfile in front of Rack::Sendfile, so `send_file` and
  # files served from public/ go out as X-Sendfile when the request came
  # through the thruster-rs proxy. Loaded by `require "thruster-rs"` (what
  # Bundler.require does) when Rails is loaded; `require "thruster/railtie"`
  # loads it without the compiled extension.
  class Railtie < Rails::Railtie
    initializer "thruster.sendfile" do |app|
      app.middleware.insert_before Rack::Sendfile, Thruster::Sendfile
    end
  end
end
