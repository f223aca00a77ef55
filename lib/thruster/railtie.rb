# frozen_string_literal: true

# Another copy of the gem (a second install) may have defined it already;
# a second definition would insert the middleware twice.
return if defined?(Thruster::Railtie)

require "rails/railtie"
require_relative "sendfile"

module Thruster
  # Puts Thruster::Sendfile in front of Rack::Sendfile, so `send_file` and
  # files served from public/ go out as X-Sendfile when the request came
  # through the thruster-rs proxy. Loaded by Thruster::RailtieHook whichever
  # of Rails and the gem loads first (lib/thruster/railtie_hook.rb);
  # `require "thruster/railtie"` loads it without the compiled extension.
  class Railtie < Rails::Railtie
    initializer "thruster.sendfile" do |app|
      app.middleware.insert_before Rack::Sendfile, Thruster::Sendfile
    end
  end
end
