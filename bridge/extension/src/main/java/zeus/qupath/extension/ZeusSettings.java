package zeus.qupath.extension;

import javafx.application.Platform;
import javafx.beans.property.StringProperty;
import javafx.geometry.Insets;
import javafx.scene.Scene;
import javafx.scene.control.Button;
import javafx.scene.control.Label;
import javafx.scene.control.PasswordField;
import javafx.scene.control.TextField;
import javafx.scene.layout.GridPane;
import javafx.scene.layout.HBox;
import javafx.stage.Modality;
import javafx.stage.Stage;
import javafx.stage.Window;
import qupath.lib.gui.prefs.PathPrefs;

/**
 * The service URL and token, kept in QuPath's own preferences (PathPrefs), and the Settings window with its
 * connection check. The token falls back to the environment variable ZEUS_TOKEN when none is set here.
 */
final class ZeusSettings {

    static final String DEFAULT_URL = "http://127.0.0.1:8765";

    private final StringProperty serviceUrl = PathPrefs.createPersistentPreference("zeus.serviceUrl", DEFAULT_URL);
    private final StringProperty token = PathPrefs.createPersistentPreference("zeus.token", "");

    String serviceUrl() {
        return serviceUrl.get();
    }

    /** The token set in Settings, else $ZEUS_TOKEN, else "". */
    String token() {
        String t = token.get();
        if (t != null && !t.isBlank())
            return t.trim();
        String env = System.getenv("ZEUS_TOKEN");
        return env == null ? "" : env.trim();
    }

    ZeusClient client() throws ZeusClient.ServiceException {
        return new ZeusClient(serviceUrl(), token());
    }

    /** The Settings window (id zeus-settings): URL, token, Check connection, Save. */
    Stage createWindow(Window owner, ZeusExtension extension) {
        Stage stage = new Stage();
        stage.setTitle("ZEUS settings");
        if (owner != null) {
            stage.initOwner(owner);
            stage.initModality(Modality.WINDOW_MODAL);
        }
        TextField url = new TextField(serviceUrl());
        url.setId("zeus-service-url");
        url.setPrefColumnCount(30);
        PasswordField tokenField = new PasswordField();
        tokenField.setId("zeus-token");
        tokenField.setText(token.get());
        tokenField.setPromptText(System.getenv("ZEUS_TOKEN") == null ? "the token zeus serve printed"
                : "empty: $ZEUS_TOKEN of QuPath's environment");
        Label result = new Label("Check the connection before segmenting.");
        result.setId("zeus-check-result");
        result.setWrapText(true);
        result.setMaxWidth(560);
        result.setMinHeight(javafx.scene.layout.Region.USE_PREF_SIZE);
        Button check = new Button("Check connection");
        check.setId("zeus-check");
        Button save = new Button("Save");
        save.setId("zeus-save");
        save.setDefaultButton(true);
        Button cancel = new Button("Cancel");
        cancel.setCancelButton(true);
        check.setOnAction(e -> {
            check.setDisable(true);
            result.setText("Checking " + url.getText() + " ...");
            String u = url.getText();
            String t = tokenField.getText().isBlank() ? (System.getenv("ZEUS_TOKEN") == null ? "" : System.getenv("ZEUS_TOKEN"))
                    : tokenField.getText();
            Thread thread = new Thread(() -> {
                String message;
                boolean ok;
                ZeusClient.Check c = null;
                try {
                    c = new ZeusClient(u, t).check();
                    message = c.message;
                    ok = c.ok;
                } catch (ZeusClient.ServiceException ex) {
                    message = ex.getMessage();
                    ok = false;
                } catch (InterruptedException ex) {
                    message = "Check interrupted.";
                    ok = false;
                }
                ZeusClient.Check found = c;
                String text = (ok ? "OK: " : "Problem: ") + message;
                Platform.runLater(() -> {
                    result.setText(text);
                    check.setDisable(false);
                    stage.sizeToScene();
                    if (found != null)
                        extension.capabilitiesChanged(found);
                });
                extension.log("connection check: " + text);
            }, "zeus-connection-check");
            thread.setDaemon(true);
            thread.start();
        });
        save.setOnAction(e -> {
            serviceUrl.set(url.getText().trim());
            token.set(tokenField.getText().trim());
            extension.log("settings saved: service URL " + serviceUrl());
            stage.close();
        });
        cancel.setOnAction(e -> stage.close());
        GridPane grid = new GridPane();
        grid.setHgap(8);
        grid.setVgap(8);
        grid.setPadding(new Insets(12));
        grid.addRow(0, new Label("Service URL"), url);
        grid.addRow(1, new Label("Token"), tokenField);
        grid.add(new Label("Start the service with: zeus serve --root <folder of your slides>; it prints the URL and token."),
                0, 2, 2, 1);
        grid.add(result, 0, 3, 2, 1);
        HBox buttons = new HBox(8, check, save, cancel);
        grid.add(buttons, 0, 4, 2, 1);
        stage.setScene(new Scene(grid));
        return stage;
    }
}
